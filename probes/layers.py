"""Per-layer write-back attribution: `python -m probes.layers --ckpt-dir DIR` -> DIR/layers.parquet.

    python -m probes.layers --ckpt-dir runs/demo/full                       # the run's caption set, stage 0 = base
    python -m probes.layers --ckpt-dir RUN --captions caps.json --images imgs/ --num-samples 200 --batch-size 16

For every checkpoint and every LM decoder layer i, the change (checkpoint minus base) of what the layer's
self-attention block and its MLP write into the residual stream, at the positions that predict caption
tokens (teacher-forced, as the number-token probe), projected through the base's unembedding.

Hook points (forward hooks, TransformerLens-style stable names):
    blocks.{i}.attn_out   output of layers[i].self_attn (after o_proj, before the residual add)
    blocks.{i}.mlp_out    output of layers[i].mlp (after down_proj: the write-back; an MoE block is the mlp)
    blocks.{i}.xattn_out  output of a cross-attention block (Mllama), times tanh of its gate
    blocks.{i}.linear_attn_out  output of a linear-attention / sequence-mixer block (Qwen3.5's Gated DeltaNet)
    ln_final.input        the residual stream entering the final norm (for its scale)
Blocks are found by `training.families.discover.layer_blocks` (component = attn, xattn, linear_attn, mlp; each
layer has the ones it has). With sandwich norms (Gemma 2/3, OLMo 2, GLM-4) a block's write is its post-norm's
output. The writes must add up (first layer's input + every write = the final norm's input: checked on the
base's first batch), so a layer layout these rules misread stops with an error instead of wrong numbers.

Both models run on the same batch through the engine's forward (`probes.forward`: the caption positions, the
vision cache shared by the stages); at each position p, D = out_checkpoint - out_base (a d-vector). The final
RMSNorm (gain = weight, or 1 + weight for zero-centred norms) is linearised at the base (the direct-logit-
attribution convention, with the base's cached scale):
    u = gamma_base * D / rms_base(x_final(p)),   rms(x) = sqrt(mean(x^2) + eps)
and dL = W_U u is the logit-space change (W_U the base's output projection; a bias cancels). Measures:
    logit_l2        || dL - mean_v dL ||_2 = sqrt(u^T G u), G = W^T W - V wbar wbar^T (the L2 norm of the
                    logit change with its mean over the vocabulary removed: the part softmax sees)
    number_logit    mean over number tokens of dL minus mean over the vocabulary of dL = (wbar_num - wbar) . u
    number_logmass  the first-order change of log(number-token mass) at the base's distribution:
                    sum_{i in num} q_i dL_i - sum_v p_v dL_v = (E_q[W_num] - E_p[W]) . u, with p the base's
                    softmax and q the base's softmax restricted to number tokens
    resid_l2        || D ||_2, the raw change of the write (before norm and unembedding)
Per sample each measure is averaged over its caption positions; rows summarise the samples like
probes.parquet (mean, sample std, 95% t interval). Since the change of a component's output includes the
change of its input, a layer whose weights did not change still has a non-zero attribution after the
first changed layer; before it, and for a checkpoint identical to the base, it is exactly 0.

Columns: run, stage, stage_name, task, recipe, checkpoint, base, layer, component (attn|xattn|linear_attn|mlp), hook,
measure, mean, std, ci_low, ci_high, n_samples, n_positions, dataset, dataset_hash; one row per
(stage, layer, component, measure). One process (no torchrun); a rerun skips stages already written (the
driver: probes.sweep).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from training.chat import tokenizer_of
from training.checkpoints import load, load_processor
from training.families import CheckpointError, family_of_model
from training.families.discover import BLOCKS, layer_blocks

from . import table
from .batching import EncodeCache, is_text_only
from .cli import add_loading_arguments
from .drift import DriftError
from .engine import Engine
from .run import load_run_captions
from .schemas import LAYERS
from .stats import SampleAccumulator
from .sweep import Command, SweepOptions, sweep
from .tokensets import token_set, vocab_fingerprint
from .vision_cache import VisionCache
from .vocab import Chunk, Head, LogSumExp, reduce_vocab

MEASURES = ("logit_l2", "number_logit", "number_logmass", "resid_l2")
COLUMNS, DTYPES, KEY = LAYERS.columns, LAYERS.dtypes, LAYERS.key    # the table's schema (probes.schemas)


def hook_name(layer: int, component: str) -> str:
    return f"blocks.{layer}.{component}_out"


# -- hooks -----------------------------------------------------------------------------------------
# (MLP post-norm, attention post-norm) of sandwich-norm layers: Gemma 2/3 and OLMo 2; GLM-4
SANDWICH = (("post_feedforward_layernorm", "post_attention_layernorm"),
            ("post_mlp_layernorm", "post_self_attn_layernorm"))


def write_points(layer: nn.Module) -> dict[str, tuple[nn.Module, torch.Tensor | None]]:
    """{component: (module whose output the layer adds to the residual stream, scalar gate or None)} of one
    decoder layer. Components are its blocks (`training.families.discover.layer_blocks`: attn, xattn,
    linear_attn, mlp; an MoE block is the mlp). With sandwich norms (SANDWICH) the write is the block's
    post-norm output; Mllama's cross-attention layers multiply each block's output by tanh of a learnt gate
    (`cross_attn_attn_gate`, `cross_attn_mlp_gate`)."""
    post = next(({"mlp": m, "attn": a} for m, a in SANDWICH if hasattr(layer, m)), {})
    gated = "xattn" in layer_blocks(layer)
    points = {}
    for comp, child in layer_blocks(layer).items():
        norm = post.get(comp, "")
        module = getattr(layer, norm) if hasattr(layer, norm) else getattr(layer, child)
        gate = getattr(layer, f"cross_attn_{'mlp' if comp == 'mlp' else 'attn'}_gate", None) if gated else None
        points[comp] = (module, gate)
    return points


class Taps:
    """Forward hooks on what each LM decoder layer's blocks write into the residual stream (`write_points`)
    and on the final norm's input, keeping only the rows selected by `mask` (B x T, bool)."""

    def __init__(self, model: nn.Module, family):
        if family.final_norm is None:
            raise CheckpointError(f"{model.config.model_type}: no final norm found; the write-back attribution "
                                  "linearises it")
        layers = model.get_submodule(family.layers)
        self.points = {hook_name(i, c): point for i, layer in enumerate(layers)
                       for c, point in write_points(layer).items()}
        self.final_norm = model.get_submodule(family.final_norm)
        self.first_layer = layers[0]
        self.n_layers = len(layers)
        self.model_type, self.dtype = model.config.model_type, model.get_output_embeddings().weight.dtype
        self.rows: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def capture(self, mask: torch.Tensor):
        self.rows = {}

        def keep(name, t, gate):
            if name in self.rows:
                raise RuntimeError(f"hook {name} fired twice in one forward")
            t = t[mask].float()
            self.rows[name] = t if gate is None else t * torch.tanh(gate.float())

        handles = [m.register_forward_hook(lambda mod, args, out, n=n, g=g: keep(n, out[0] if isinstance(out, tuple)
                                                                                else out, g))
                   for n, (m, g) in self.points.items()]
        handles.append(self.final_norm.register_forward_pre_hook(
            lambda mod, args, kwargs: keep("ln_final.input", args[0] if args else kwargs["hidden_states"], None),
            with_kwargs=True))
        handles.append(self.first_layer.register_forward_pre_hook(
            lambda mod, args, kwargs: keep("resid_pre", args[0] if args else kwargs["hidden_states"], None),
            with_kwargs=True))
        try:
            yield self.rows
        finally:
            for h in handles:
                h.remove()


    def check_writes(self) -> None:
        """The captured writes add up to the residual stream (see the module docstring); else stop."""
        r = self.rows
        total = r["resid_pre"] + sum(v for k, v in r.items() if k.startswith("blocks."))
        ref = r["ln_final.input"]
        err = float((total - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        if err > (1e-3 if self.dtype == torch.float32 else 5e-2):
            raise CheckpointError(f"{self.model_type}: the blocks' outputs do not add up to the residual stream "
                                  f"(relative error {err:.2g}); probes.layers cannot read this layer layout")

# -- the base's readout ----------------------------------------------------------------------------
class ExpectedRow:
    """A `probes.vocab` accumulator: E_p[W] = sum_v p_v W_v per row (fp64), with acc = sum_v e^(z_v - m) W_v
    rescaled like s when m grows, divided by s at the end."""

    def __init__(self, weight: torch.Tensor):
        self.W, self.acc = weight, None

    def add(self, chunks: Sequence[Chunk]) -> None:
        c = chunks[0]
        part = c.e @ self.W[c.c0:c.c1].double()
        self.acc = part if c.alpha is None else c.alpha[:, None] * self.acc + part

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        return {"expected_w": self.acc / lse[0].s[:, None]}


def rms_gain(norm: nn.Module, eps: float) -> torch.Tensor:
    """The per-channel gain gamma of an RMSNorm, y = gamma * x / rms(x), read from the norm itself: its weight,
    or 1 + weight for the zero-centred norms (Gemma, Qwen3.5). A norm that is not of this form stops."""
    w = norm.weight.detach()
    x = torch.linspace(-1.0, 2.0, w.numel(), device=w.device, dtype=torch.float64)[None]
    with torch.no_grad():
        y = norm(x.to(w.dtype)).double()
    rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    for gamma in (w.double(), 1 + w.double()):
        if torch.allclose(y, gamma * x * rms, rtol=1e-2, atol=1e-3):
            return gamma
    raise CheckpointError(f"final norm {type(norm).__name__} is not an RMSNorm (weight or 1 + weight); its "
                          "linearisation is not implemented")


class Readout:
    """The base's final norm and unembedding, linearised (see the module docstring)."""

    def __init__(self, model: nn.Module, number_ids: list[int], chunk_elems: int = 1 << 24):
        family = family_of_model(model)
        norm = model.get_submodule(family.final_norm)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if getattr(norm, "weight", None) is None or eps is None:
            raise CheckpointError(f"final norm {type(norm).__name__} is not an RMSNorm with weight and epsilon; "
                                  "its linearisation is not implemented")
        self.gamma, self.eps = rms_gain(norm, float(eps)), float(eps)
        W = model.get_output_embeddings().weight.detach()
        self.W, self.chunk_elems = W, chunk_elems
        V, d = W.shape
        G = torch.zeros(d, d, dtype=torch.float64, device=W.device)
        wsum = torch.zeros(d, dtype=torch.float64, device=W.device)
        step = max(1, chunk_elems // d)
        for c0 in range(0, V, step):
            w = W[c0:c0 + step].double()
            G += w.T @ w
            wsum += w.sum(0)
        wbar = wsum / V
        self.G = G - V * torch.outer(wbar, wbar)
        self.num = torch.tensor(number_ids, dtype=torch.long, device=W.device)
        self.num_dir = W[self.num].double().mean(0) - wbar

    def scale(self, x_final: torch.Tensor) -> torch.Tensor:
        """1 / rms(x) per row, as RMSNorm computes it (fp64)."""
        x = x_final.double()
        return torch.rsqrt(x.pow(2).mean(-1) + self.eps)

    def logmass_dir(self, h_normed: torch.Tensor) -> torch.Tensor:
        """E_q[W_num] - E_p[W] per row (N x d), from the base's final (normed) hidden rows; the expectation
        over the whole vocabulary is accumulated in chunks with an online softmax (all rows at once)."""
        N, V = h_normed.shape[0], self.W.shape[0]
        cols = max(1, min(V, self.chunk_elems // max(N, 1)))
        out = reduce_vocab([h_normed], [Head(self.W, None, torch.float64)], lambda: [ExpectedRow(self.W)],
                           rows=max(N, 1), cols=cols)
        zn = (h_normed.to(self.W.dtype) @ self.W[self.num].T).double()
        q = torch.softmax(zn, dim=1)
        return q @ self.W[self.num].double() - out["expected_w"]

    def measures(self, delta: torch.Tensor, scale: torch.Tensor, lm_dir: torch.Tensor) -> dict[str, torch.Tensor]:
        u = delta.double() * self.gamma * scale[:, None]
        return {"logit_l2": torch.sqrt(((u @ self.G) * u).sum(1).clamp(min=0)), "number_logit": u @ self.num_dir,
                "number_logmass": (u * lm_dir).sum(1), "resid_l2": delta.double().norm(dim=1)}


# -- one checkpoint against the base ---------------------------------------------------------------
@torch.inference_mode()
def attribute(base: Engine, ck: Engine, readout: Readout, samples, batches: list[list[int]],
              progress: bool = False) -> dict[int, dict]:
    """{sample index: {"HOOK|MEASURE": value, "n_positions": n}} for one checkpoint against the base."""
    fam = base.family
    if family_of_model(ck.model).name != fam.name:
        raise CheckpointError("base and checkpoint are of different model families")
    tb, tc = Taps(base.model, fam), Taps(ck.model, fam)
    if tb.n_layers != tc.n_layers:
        raise CheckpointError(f"base has {tb.n_layers} decoder layers, the checkpoint {tc.n_layers}")
    names = [f"{h}|{m}" for h in tb.points for m in MEASURES]
    out: dict[int, dict] = {}
    bar = tqdm(total=len(batches), desc="layers", unit="batch", disable=not progress, leave=False)
    for idx, batch, keys in ck.stream(samples, batches, True, "right"):
        hb, seg = base.forward.caption_rows(samples, idx, batch, keys, hooks=tb.capture)
        ck.forward.caption_rows(samples, idx, batch, keys, hooks=tc.capture)
        rb, rc = tb.rows, tc.rows
        if not out:
            tb.check_writes()
        scale = readout.scale(rb["ln_final.input"])
        lm_dir = readout.logmass_dir(hb)
        values = {}
        for h in tb.points:
            for m, v in readout.measures(rc[h] - rb[h], scale, lm_dir).items():
                values[f"{h}|{m}"] = v
        acc = SampleAccumulator(names, len(idx), ck.device)
        acc.add(seg, values)
        for i, r in zip(idx, acc.result()):
            out[i] = r
        bar.update()
    bar.close()
    return out


def rows_for(run, ck, base_rel: str, per_sample: dict[int, dict], caps) -> list[dict]:
    n = len(caps.samples)
    if sorted(per_sample) != list(range(n)):
        raise RuntimeError(f"{ck.path}: got values for {len(per_sample)} of {n} samples")
    ordered = [per_sample[i] for i in range(n)]
    n_pos = int(sum(v["n_positions"] for v in ordered))
    rows = []
    for key in [k for k in ordered[0] if k != "n_positions"]:
        hook, measure = key.split("|")
        _, layer, comp = hook.split(".")
        rows.append({"run": run.name, "stage": ck.stage, "stage_name": ck.stage_name, "task": ck.task,
                     "recipe": run.recipe, "checkpoint": ck.rel, "base": base_rel, "layer": int(layer),
                     "component": comp.removesuffix("_out"), "hook": hook, "measure": measure,
                     **table.summarize(v[key] for v in ordered), "n_positions": n_pos, "dataset": caps.name,
                     "dataset_hash": caps.hash})
    return rows


# -- the command -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LayersOptions(SweepOptions):
    captions: str | None = None              # the caption set (default: run.json's)
    images: str | None = None
    num_samples: int | None = None
    sample: str = "first"
    seed: int = 0
    batch_size: int = 16
    base: str | None = None                  # the base checkpoint (default: the run's stage 0)


def parse_args(argv=None) -> LayersOptions:
    ap = argparse.ArgumentParser(prog="python -m probes.layers", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", required=True, help="a run directory (run.json) or a folder of checkpoints")
    ap.add_argument("--captions", help="caption set (default: the one run.json names)")
    ap.add_argument("--images", help="images root (default: run.json's, else the caption file's folder)")
    ap.add_argument("--num-samples", type=int, default=None, help="how many captions (default: the first 1000)")
    ap.add_argument("--sample", choices=["first", "random"], default="first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16, help="samples per forward pass (default 16)")
    ap.add_argument("--base", help="the base checkpoint (default: the run's stage 0)")
    ap.add_argument("--out", help="the table (default: CKPT_DIR/layers.parquet)")
    add_loading_arguments(ap, records="caption record")
    ap.add_argument("--replace", action="store_true", help="replace rows computed on other captions or another base")
    args = ap.parse_args(argv)
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    return LayersOptions.from_args(args)


def read_layers(path: Path) -> pd.DataFrame:
    return table.read_table(path, COLUMNS, DTYPES, "layer table")


class Layers(Command):
    """Per checkpoint, one unit: every layer's attribution against the base, which setup loads once."""
    prog, table_file, sharded = "probes.layers", "layers.parquet", False
    input_errors = Command.input_errors + (DriftError,)

    def setup(self, run, out, procs) -> None:
        super().setup(run, out, procs)
        o = self.opts
        read_layers(out)                          # a foreign file stops here, before any model
        if o.base:
            self.base_path, self.base_rel = Path(o.base), str(Path(o.base).resolve())
        else:
            first = min(run.checkpoints, key=lambda c: c.stage)
            if first.stage != 0:
                raise DriftError(f"{run.root}: no stage 0 to serve as the base; pass --base PATH")
            self.base_path, self.base_rel = first.path, first.rel
        self.processor = load_processor(self.base_path, o.load)
        self.caps = load_run_captions(o, run, text_only=is_text_only(self.processor))
        self.cache, self.vision = EncodeCache(), VisionCache()   # the stages share encodings and (LM-only) image features
        base_model, _ = load(self.base_path, o.load, processor=self.processor)
        self.base = Engine(base_model, self.processor, token_sets=(), encode_cache=self.cache, vision_cache=self.vision)
        self.readout = Readout(base_model, token_set(tokenizer_of(self.processor), "number"))
        self.n_points = len(Taps(base_model, self.base.family).points)
        self.batches = self.base.plan(self.caps.samples, o.batch_size, True)

    def plan(self, checkpoints, out):
        df = read_layers(out)
        plan = []
        for ck in checkpoints:
            done, clash = _done(df, ck, self.base_rel, self.n_points, self.caps.hash)
            if done:
                plan.append(([], None))
            elif len(clash) and not self.opts.replace:
                r = clash.iloc[0]
                plan.append(([], f"{out} has rows for stage {ck.stage} from checkpoint {r['checkpoint']}, base "
                                 f"{r['base']}, captions {r['dataset_hash']}; use --out or --replace"))
            else:
                plan.append((["layers"], None))
        return plan

    def header(self):
        o, caps = self.opts.load, self.caps
        return [f"probes.layers: {len(self.run.checkpoints)} checkpoint(s) in {self.run.root} against "
                f"{self.base_path}; captions {caps.source} ({len(caps.samples)} samples, hash {caps.hash}); "
                f"{o.device} {o.dtype} -> {self.out}"]

    def warnings(self):
        return [self.caps.report()] if self.caps.report() else []

    def open(self, ck) -> Engine:
        own = load_processor(ck.path, self.opts.load)
        if vocab_fingerprint(tokenizer_of(own)) != vocab_fingerprint(tokenizer_of(self.processor)):
            raise CheckpointError(f"{ck.path}: its tokenizer differs from the base's")
        model, _ = load(ck.path, self.opts.load, processor=self.processor)
        return Engine(model, self.processor, token_sets=(), encode_cache=self.cache, vision_cache=self.vision)

    def compute(self, eng: Engine, ck, unit) -> dict[int, dict]:
        return attribute(self.base, eng, self.readout, self.caps.samples, self.batches, progress=True)

    def rows(self, ck, unit, shares) -> list[dict]:
        return rows_for(self.run, ck, self.base_rel, shares[0], self.caps)

    def append(self, out, rows) -> None:
        table.append_rows(out, rows, columns=COLUMNS, dtypes=DTYPES, key=KEY,
                          order=["stage", "layer", "component", "measure"], what="layer table")

    def summary(self, status) -> None:
        print_summary(self.out, self.run, status, self.caps.hash)


def _done(df: pd.DataFrame, ck, base_rel: str, n_points: int, dataset_hash: str) -> tuple[bool, pd.DataFrame]:
    if not len(df):
        return False, df
    sel = df[df["stage"] == ck.stage]
    same = sel[(sel["checkpoint"] == ck.rel) & (sel["base"] == base_rel) & (sel["dataset_hash"] == dataset_hash)]
    return len(same) == n_points * len(MEASURES), sel.drop(same.index)


def main(argv=None) -> int:
    return sweep(Layers(parse_args(argv)))


def layer_cell(v: dict[str, float]) -> str:
    """'attn / mlp'; a layer's other blocks named (Qwen3.5's linear attention, Mllama's cross-attention)."""
    if set(v) <= {"attn", "mlp"}:
        return f"{v.get('attn', float('nan')):.3g} / {v.get('mlp', float('nan')):.3g}"
    short = {"xattn": "xattn ", "linear_attn": "lin "}
    return " / ".join(f"{short.get(c, '')}{v[c]:.3g}" for c in BLOCKS if c in v)


def print_summary(out_path: Path, run, status: dict, dataset_hash: str) -> None:
    df = table.read_table(out_path, COLUMNS, DTYPES, "layer table")
    df = df[(df["dataset_hash"] == dataset_hash) & (df["measure"] == "logit_l2")] if len(df) else df
    print(f"\n{out_path}: logit_l2 (mean over samples) per layer, attn / mlp (other blocks named: "
          "xattn = cross-attention, lin = linear attention)")
    lines = []
    for ck in run.checkpoints:
        row = {"stage": ck.stage, "name": ck.stage_name}
        sel = df[df["stage"] == ck.stage] if len(df) else df
        for layer, g in sel.groupby("layer"):
            row[f"L{layer}"] = layer_cell(dict(zip(g["component"], g["mean"])))
        row["status"] = status.get(ck.stage, "").splitlines()[0][:80] if status.get(ck.stage) else ""
        lines.append(row)
    with pd.option_context("display.max_columns", None, "display.width", 250):
        print(pd.DataFrame(lines).fillna("").to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
