"""`probes.run` options beyond the token-set probes: drift from a base model and task signatures.

    python -m probes.run --ckpt-dir RUN --drift                  # + kl_to_base, top1_agreement (teacher-forced)
    python -m probes.run --ckpt-dir RUN --drift --base /ckpts/Qwen2.5-VL-7B-Instruct
    python -m probes.run --ckpt-dir RUN --signatures             # + sig_<task>_mass for every task of the run
    python -m probes.run --ckpt-dir RUN --signatures --signature-file docvqa=docvqa/train.json

`setup` resolves the base and derives the signatures (the inputs: a bad one stops the command); `Extras.start`
makes the base reference of --drift once, before the first checkpoint: the base's hidden states on this
rank's batches, after which the base model itself is released (its output projection stays), so every
checkpoint's KL is against the same cached base. Definitions: probes/drift.py (KL, agreement) and
probes/signatures.py (signatures); docs/probes.md.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from training.chat import tokenizer_of
from training.checkpoints import LoadOptions, load, load_processor
from training.families import CheckpointError

from . import drift
from .batching import EncodeCache
from .signatures import MIN_COUNT, PRIOR, TOP_K, Z_MIN, Signature, SignatureError, derive_all, write_json
from .stats import probe_names
from .tokensets import vocab_fingerprint
from .vision_cache import VisionCache


@dataclass(frozen=True)
class DriftOptions:
    drift: bool = False                      # + kl_to_base, top1_agreement (teacher-forced)
    base: str | None = None                  # the base of drift (default: the run's stage 0)
    signatures: bool = False                 # + sig_<task>_mass / _max_prob
    signature_tasks: list[str] | None = None
    signature_file: dict[str, str] = field(default_factory=dict)   # task -> training file
    signature_k: int = TOP_K
    signature_z: float = Z_MIN
    signature_prior: float = PRIOR


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("drift from the base and task signatures (docs/probes.md)")
    g.add_argument("--drift", action="store_true",
                   help="also kl_to_base = KL(base || checkpoint) and top1_agreement with the base, teacher-forced, "
                        "exact; the base runs over the same batches")
    g.add_argument("--base", help="the base checkpoint of --drift (default: the run's stage 0)")
    g.add_argument("--signatures", action="store_true",
                   help="also sig_<task>_mass (and _max_prob): the mass on each task's answer-token signature "
                        "(written to signatures.json next to the table)")
    g.add_argument("--signature-tasks", help="comma-separated tasks (default: run.json's tasks)")
    g.add_argument("--signature-file", action="append", metavar="NAME=PATH", default=[],
                   help="a task's training file (LLaVA JSON) for its signature; implies --signatures (repeatable)")
    g.add_argument("--signature-k", type=int, default=TOP_K, help=f"at most K tokens per signature ({TOP_K})")
    g.add_argument("--signature-z", type=float, default=Z_MIN, help=f"least z of a signature token ({Z_MIN})")
    g.add_argument("--signature-prior", type=float, default=PRIOR,
                   help=f"prior mass as a fraction of both corpora's tokens ({PRIOR})")


def options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> DriftOptions:
    """The flags of `add_arguments`, checked (a bad one is `ap.error`)."""
    files = {}
    for item in args.signature_file:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            ap.error(f"--signature-file {item!r}: expected NAME=PATH")
        files[name] = path
    tasks = [t.strip() for t in (args.signature_tasks or "").split(",") if t.strip()] or None
    if args.signature_k < 1:
        ap.error("--signature-k must be at least 1")
    if args.signature_prior <= 0:
        ap.error("--signature-prior must be positive")
    if args.base and not args.drift:
        ap.error("--base is the base of --drift; add --drift")
    return DriftOptions(drift=args.drift, base=args.base, signatures=bool(args.signatures or files or tasks),
                        signature_tasks=tasks, signature_file=files, signature_k=args.signature_k,
                        signature_z=args.signature_z, signature_prior=args.signature_prior)


class Extras:
    """What the drift options add to one probes.run: the base of --drift, the signatures, and (after `start`)
    the base reference every checkpoint's KL is computed against."""

    def __init__(self, base_path: Path | None = None, sigs: list[Signature] | None = None):
        self.base_path, self.sigs = base_path, list(sigs or [])
        self.ref: drift.BaseReference | None = None

    @property
    def drift(self) -> bool:
        return self.base_path is not None

    @property
    def sig_sets(self) -> dict[str, list[int]]:
        return {s.name: s.ids for s in self.sigs if s.tokens}

    def names(self, token_sets, mode: str) -> list[str]:
        """The probes of one mode: token sets (signatures included) and entropy; drift when teacher-forced."""
        out = probe_names(list(token_sets) + list(self.sig_sets))
        return out + list(drift.DRIFT_PROBES) if self.drift and mode == "teacher-forced" else out

    def start(self, processor, samples, batch_size: int, share, opts: LoadOptions, cache: EncodeCache,
              vision_cache: VisionCache | None = None) -> None:
        """The base reference: the base (with the run's processor) over this rank's share of the teacher-forced
        plan, its hidden states cached, then the model released when they all fit (only its head stays)."""
        own = load_processor(self.base_path, opts)
        if vocab_fingerprint(tokenizer_of(own)) != vocab_fingerprint(tokenizer_of(processor)):
            raise CheckpointError(f"{self.base_path}: the base's tokenizer differs from the run's; KL over "
                                  "different vocabularies is not defined")
        model, _ = load(self.base_path, opts, processor=processor)
        self.ref = drift.BaseReference(model, processor, encode_cache=cache, vision_cache=vision_cache,
                                       name=str(self.base_path))
        del model
        for idx in share(self.ref.engine.plan(samples, batch_size, True)):
            self.ref.rows(samples, idx)
        self.ref.release_model()

    def teacher_forced(self, eng, samples, batches, progress: bool) -> dict:
        return drift.teacher_forced(eng, self.ref, samples, batches, progress=progress)


def setup(opts: DriftOptions, run, caps, out_path: Path, load_opts: LoadOptions, say=print,
          write: bool = True) -> Extras:
    """Resolve the base and derive the signatures (`write`: also signatures.json next to the table)."""
    ex = Extras()
    if opts.drift:
        if opts.base:
            ex.base_path = Path(opts.base)
        else:
            first = min(run.checkpoints, key=lambda c: c.stage)
            if first.stage != 0:
                raise drift.DriftError(f"{run.root}: no stage 0 to serve as the base of --drift; pass --base PATH")
            ex.base_path = first.path
        if not ex.base_path.is_dir():
            raise drift.DriftError(f"--base {ex.base_path}: not a checkpoint folder")
        say(f"probes.run: drift against {ex.base_path}")
    if opts.signatures:
        processor = load_processor(run.checkpoints[0].path, load_opts)
        try:
            ex.sigs = derive_all(run.manifest, [s.caption for s in caps.samples], processor, opts.signature_tasks,
                                 opts.signature_file, prior=opts.signature_prior, z_min=opts.signature_z,
                                 min_count=MIN_COUNT, top_k=opts.signature_k)
        except SignatureError as e:
            raise drift.DriftError(str(e)) from None
        for s in ex.sigs:
            shown = ", ".join(repr(t["token"]) for t in s.tokens[:8])
            say(f"probes.run: signature {s.name}: {len(s.tokens)} tokens ({shown}{', ...' if len(s.tokens) > 8 else ''})"
                if s.tokens else f"probes.run: task {s.task}: no token is over-represented in its answers; no signature")
        if write:
            write_json(Path(out_path).with_name("signatures.json"), ex.sigs,
                       {"prior": opts.signature_prior, "z_min": opts.signature_z, "min_count": MIN_COUNT,
                        "top_k": opts.signature_k},
                       {"dataset": caps.name, "dataset_hash": caps.hash, "n_captions": len(caps.samples)})
    return ex
