"""The batched probe engine: output-distribution statistics of one checkpoint over a set of samples.

Two modes, both exact (no sampling, no approximation), both batched:

- teacher-forced: the checkpoint's chat template with the reference caption as the assistant turn; the
  base model runs to hidden states, only the positions that predict caption tokens are gathered, and the
  output projection is applied to those rows in vocabulary chunks with an online log-sum-exp, so memory
  is bounded by `chunk_elems` and never grows as sequence x vocabulary.
- generation (the study's definition): greedy decoding with a KV cache from the prompt (image +
  instruction), up to `max_new_tokens`; statistics at every step including the one that emits the stop
  token; each sequence stops on its own (finished rows leave the batch).

Per position (or step) with logits z over the whole output vocabulary V and a token set S:
  {S}_mass     = sum_{i in S} softmax(z)_i = exp(logsumexp(z_S) - logsumexp(z))
  {S}_max_prob = max_{i in S} softmax(z)_i
  entropy      = -sum_i p_i log p_i (nats)
Per sample: mass and entropy are averaged over the sample's positions (steps); max_prob is the maximum
over them (the largest single token-set probability the sample shows). Across samples see `summarize`.

    eng = Engine(model, processor, token_sets=("number",))
    per_sample = eng.teacher_forced(samples, batch_size=32)     # {sample index: {probe: value, ...}}
    gens = eng.generate(samples, batch_size=32, max_new_tokens=256, stats=True)
    gens[0].text, gens[0].stats["number_mass"]
"""
from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from training.chat import EncodingError, answer_affixes, collate
from training.families import family_of_model

from .captions import CaptionDataError, Sample
from .encoding import Encoder
from .tokensets import decoded_vocab, token_set
from .vision_cache import VisionCache, vision_fingerprint

DEFAULT_CHUNK_ELEMS = 1 << 24      # logits held at once (64 MiB in fp32)
MAX_NEW_TOKENS = 256               # the study's generation length
MASKS = ("answer_mask", "eot_mask")


class NonFiniteLogits(ValueError):
    """NaN or infinite logits: the message names the sample; probes.run / probes.evaluate add the checkpoint."""


def probe_names(set_names: Iterable[str]) -> list[str]:
    names = []
    for s in set_names:
        names += [f"{s}_mass", f"{s}_max_prob"]
    return names + ["entropy"]


# -- statistics over the vocabulary, in chunks -----------------------------------------------------
@dataclass
class VocabStats:
    lse: torch.Tensor                      # (N,) logsumexp over the whole vocabulary, fp64
    entropy: torch.Tensor                  # (N,) nats
    set_lse: dict[str, torch.Tensor]       # (N,) logsumexp over each token set
    set_max: dict[str, torch.Tensor]       # (N,) largest logit within each token set
    argmax: torch.Tensor | None = None     # (N,) greedy token (first index among ties)

    def probes(self) -> dict[str, torch.Tensor]:
        out = {}
        for s in self.set_lse:
            out[f"{s}_mass"] = torch.exp(self.set_lse[s] - self.lse)
            out[f"{s}_max_prob"] = torch.exp(self.set_max[s] - self.lse)
        out["entropy"] = self.entropy
        return out


def logits_block(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One block of logits, fp32: rows of `h` against a slice of the output projection (the only place
    full-vocabulary logits are made; tests wrap it to check the block size)."""
    z = h @ w.T
    if b is not None:
        z = z + b
    return z.float()


def vocab_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], *, want_argmax: bool = False,
                chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> VocabStats:
    """Statistics of softmax(hidden @ weight.T + bias) per row, never holding more than ~chunk_elems logits.

    The projection runs in the weights' dtype (as the model's own lm_head would), exponentials in fp32,
    and the per-row sums in fp64 (a few numbers per row, so rounding does not grow with the vocabulary). The entropy uses an online form: with m the running max, s = sum e^(z-m), t = sum e^(z-m)(z-m),
    H = log s - t / s, rescaled whenever m grows.
    """
    N, V = hidden.shape[0], weight.shape[0]
    out = {k: [hidden.new_zeros(0, dtype=torch.float64)] for k in ("lse", "entropy")}
    out["argmax"] = [torch.zeros(0, dtype=torch.long, device=hidden.device)]
    rows = max(1, min(N, math.isqrt(chunk_elems)))   # 4096 x 4096 blocks by default
    cols = max(1, min(V, chunk_elems // rows))
    for r0 in range(0, N, rows):
        h = hidden[r0:r0 + rows]
        m = s = t = best = best_i = None
        for c0 in range(0, V, cols):
            z = logits_block(h, weight[c0:c0 + cols], None if bias is None else bias[c0:c0 + cols])
            cm, ci = z.max(dim=1)
            if m is None:
                m_new = cm
                d = z - m_new[:, None]
                e = torch.exp(d)
                s, t = e.sum(1, dtype=torch.float64), (e * d).sum(1, dtype=torch.float64)
                best, best_i = cm, ci
            else:
                m_new = torch.maximum(m, cm)
                shift = (m - m_new).double()
                alpha = torch.exp(shift)
                d = z - m_new[:, None]
                e = torch.exp(d)
                t = alpha * (t + s * shift) + (e * d).sum(1, dtype=torch.float64)
                s = alpha * s + e.sum(1, dtype=torch.float64)
                better = cm > best                       # strict: an earlier chunk wins ties
                best = torch.where(better, cm, best)
                best_i = torch.where(better, ci + c0, best_i)
            m = m_new
        log_s = torch.log(s)
        out["lse"].append(m.double() + log_s)
        out["entropy"].append(log_s - t / s)
        out["argmax"].append(best_i)
    set_lse, set_max = {}, {}
    for name, (w, b) in sets.items():
        z = hidden @ w.T
        if b is not None:
            z = z + b
        z = z.double()
        set_lse[name] = torch.logsumexp(z, dim=1)
        set_max[name] = z.max(dim=1).values
    return VocabStats(torch.cat(out["lse"]), torch.cat(out["entropy"]), set_lse, set_max,
                      torch.cat(out["argmax"]) if want_argmax else None)


class SampleAccumulator:
    """Per-sample reductions over positions (or steps), on the device: sums for means, maxima for max_prob."""

    def __init__(self, names: Sequence[str], n: int, device):
        self.n_pos = torch.zeros(n, dtype=torch.long, device=device)
        self.sums = {k: torch.zeros(n, dtype=torch.float64, device=device) for k in names if not _is_max(k)}
        self.maxs = {k: torch.full((n,), -math.inf, dtype=torch.float64, device=device) for k in names if _is_max(k)}

    def add(self, seg: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        """values[k][r] belongs to sample seg[r]."""
        self.n_pos.index_add_(0, seg, torch.ones_like(seg))
        for k, acc in self.sums.items():
            acc.index_add_(0, seg, values[k].double())
        for k, acc in self.maxs.items():
            acc.scatter_reduce_(0, seg, values[k].double(), reduce="amax")

    def result(self) -> list[dict]:
        n = self.n_pos.tolist()
        cols = {k: (v / self.n_pos.clamp(min=1)).tolist() for k, v in self.sums.items()}
        cols |= {k: v.tolist() for k, v in self.maxs.items()}
        return [{k: c[j] for k, c in cols.items()} | {"n_positions": n[j]} for j in range(len(n))]


def _is_max(name: str) -> bool:
    return name.endswith("_max_prob")


# -- the engine ------------------------------------------------------------------------------------
@dataclass
class Generation:
    index: int                         # position of the sample in the list given to `generate`
    token_ids: list[int]               # generated ids, the stop token included when one was emitted
    text: str                          # decoded, special tokens removed
    stopped: bool                      # emitted a stop token (else it ran to max_new_tokens)
    stats: dict[str, float] = field(default_factory=dict)  # per-sample probe values (when stats=True)
    n_steps: int = 0


class EncodeCache:
    """Encoded samples shared by the checkpoints of a run: they share one processor, so the image
    preprocessing and tokenisation (most of the time on small models) are done once. Keyed by the
    processor's identity and the sample's content; stops storing beyond `max_bytes` of tensors.
    Also holds one memoising `Encoder` per processor key."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes, self.bytes, self.store = max_bytes, 0, {}
        self.encoders: dict[str, Encoder] = {}
        self.plans: dict[tuple, list[list[int]]] = {}

    def get(self, key):
        return self.store.get(key)

    def put(self, key, ex) -> None:
        size = sum(t.nbytes for t in [ex.input_ids, *ex.image_inputs.values(), *ex.token_type_ids.values()]
                   if torch.is_tensor(t))
        if key not in self.store and self.bytes + size <= self.max_bytes:
            self.store[key] = ex
            self.bytes += size

    def encoder(self, processor, key: str) -> Encoder:
        if key not in self.encoders:
            self.encoders[key] = Encoder(processor)
        return self.encoders[key]


def processor_key(processor) -> str:
    """What makes two processors encode alike: vocabulary, chat template, image processor settings."""
    import hashlib

    from .tokensets import vocab_fingerprint

    tok = processor.tokenizer
    parts = [vocab_fingerprint(tok), str(getattr(processor, "chat_template", None) or tok.chat_template),
             processor.image_processor.to_json_string() if hasattr(processor, "image_processor") else "",
             type(processor).__name__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def default_workers(device: torch.device) -> int:
    """Preprocessing processes: none on a CPU (the cores run the model), several beside a GPU: up to 8, at
    most half the cores this process may share with the other ranks on its node (torchrun)."""
    import os

    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores // (2 * ranks)))


# Whether the vision-cache forward (input embeddings with precomputed image features) gives the model's own
# hidden states, per (model class, dtype, device type, attention): checked once per process on a real batch.
_EMBEDS_PATH_OK: dict[tuple, bool] = {}


class _Batches(torch.utils.data.Dataset):
    """Planned batches for DataLoader workers: item k is batch k, encoded and collated."""

    def __init__(self, prepare, batches):
        self.prepare, self.batches = prepare, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.prepare(self.batches[k])


class Engine:
    """One loaded checkpoint (model + its processor) ready to probe or generate in batches.

    Speed (none of it changes a number; the tests check each against the per-sample reference):
    samples are encoded by a memoising `Encoder` (exactly `training.chat.encode`'s tensors); on a GPU the
    next batches are encoded while the model runs, by `workers` DataLoader processes into pinned memory
    (default: up to 8) or else by a thread `prefetch` batches ahead (on a CPU both default to off: the
    preprocessing and the model share the same cores, and the benchmark measured no gain there);
    `encode_cache` shares encodings and `vision_cache` image features across the checkpoints of a run;
    `compile` compiles each decoder layer (for GPUs; batch and sequence shapes vary, so dynamic=True).
    """

    def __init__(self, model: nn.Module, processor, *, token_sets: Sequence[str] = ("number",),
                 set_ids: dict[str, list[int]] | None = None, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 encode_cache: EncodeCache | None = None, vision_cache: VisionCache | None = None,
                 prefetch: int | None = None, workers: int | None = None, compile: bool = False):
        self.model, self.processor = model.eval(), processor
        self.cache = encode_cache
        self._proc_key = processor_key(processor) if (encode_cache or vision_cache) is not None else None
        self.encoder = encode_cache.encoder(processor, self._proc_key) if encode_cache is not None \
            else Encoder(processor)
        self.tokenizer = processor.tokenizer
        self.family = family_of_model(model)
        self.base = model.base_model              # the multimodal model without its output projection
        head = model.get_output_embeddings()
        self.weight, self.bias = head.weight, getattr(head, "bias", None)
        self.device, self.dtype = self.weight.device, self.weight.dtype
        self.chunk_elems = chunk_elems
        self.prefetch = (2 if self.device.type == "cuda" else 0) if prefetch is None else prefetch
        self.workers = default_workers(self.device) if workers is None else workers
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if set_ids is None:
            vocab = decoded_vocab(tok) if token_sets else []
            set_ids = {n: token_set(tok, n, vocab) for n in token_sets}
        self.set_ids = set_ids
        # ids only: the rows are gathered from the live weights at every use, so an engine over a model that is
        # being trained (training.monitor) sees its current weights
        self._set_idx = {n: torch.tensor(ids, dtype=torch.long, device=self.device) for n, ids in set_ids.items()}
        self.probe_names = probe_names(set_ids)
        self.stop_ids = stop_token_ids(model, processor)
        self.vision_cache = vision_cache
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self._vision_fp = None
        if vision_cache is not None and self.image_token_id is not None:
            self._vision_fp = vision_fingerprint(model, self.family)
        if compile:
            compile_decoder_layers(model, self.family)

    # -- inputs ------------------------------------------------------------------------------------
    def _key(self, sample: Sample, with_answer: bool):
        return (self._proc_key, sample.id, sample.image_ref, sample.instruction,
                sample.caption if with_answer else None)

    def encode_samples(self, samples: Sequence[Sample], with_answer: bool) -> list:
        """The Examples (`training.chat.encode`'s) for these samples: from the run's cache, else encoded."""
        out, todo = [None] * len(samples), []
        for j, s in enumerate(samples):
            if with_answer and s.caption is None:
                raise CaptionDataError(f"sample {s.id!r} has no caption to teacher-force")
            hit = self.cache.get(self._key(s, with_answer)) if self.cache is not None else None
            if hit is not None:
                out[j] = hit
            else:
                todo.append(j)
        if todo:
            items = [(samples[j].open_image(), samples[j].instruction, samples[j].caption if with_answer else None)
                     for j in todo]
            try:
                exs = self.encoder.encode_many(items)
            except EncodingError:        # find and name the sample
                for j, item in zip(todo, items):
                    try:
                        self.encoder.encode_many([item])
                    except EncodingError as e:
                        raise CaptionDataError(f"sample {samples[j].id!r}: {e}") from e
                raise
            for j, ex in zip(todo, exs):
                out[j] = ex
                if self.cache is not None and samples[j].image_ref:   # in-memory images have no stable identity
                    self.cache.put(self._key(samples[j], with_answer), ex)
        return out

    def encode(self, sample: Sample, with_answer: bool):
        return self.encode_samples([sample], with_answer)[0]

    def _prepare(self, samples, idx, with_answer: bool, padding_side: str, pin: bool):
        exs = self.encode_samples([samples[i] for i in idx], with_answer)
        batch = collate(exs, self.family, self.pad_id, padding_side)
        if pin:
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        keys = sorted({k for e in exs for k in e.image_inputs})
        return idx, batch, keys

    def stream(self, samples: Sequence[Sample], batches: list[list[int]], with_answer: bool,
               padding_side: str) -> Iterator[tuple[list[int], dict, list[str]]]:
        """(indices, collated CPU batch, image input keys) per planned batch, prepared ahead of use:
        by `workers` DataLoader processes, else by one background thread `prefetch` batches ahead."""
        cuda = self.device.type == "cuda"
        if self.workers > 0 and len(batches) > 1:
            from functools import partial

            prep = partial(self._prepare, samples, with_answer=with_answer, padding_side=padding_side, pin=False)
            loader = torch.utils.data.DataLoader(_Batches(prep, batches), batch_size=None, shuffle=False,
                                                 num_workers=min(self.workers, len(batches)), pin_memory=cuda,
                                                 prefetch_factor=2)
            yield from loader
            return
        make = lambda idx: self._prepare(samples, idx, with_answer, padding_side, cuda)  # noqa: E731
        if self.prefetch <= 0 or len(batches) <= 1:
            yield from map(make, batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="probe-prefetch") as pool:
            todo, ahead = iter(batches), deque()
            for idx in todo:
                ahead.append(pool.submit(make, idx))
                if len(ahead) > self.prefetch:
                    break
            while ahead:
                fut = ahead.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    ahead.append(pool.submit(make, nxt))
                yield fut.result()

    def to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, dtype=self.dtype if v.is_floating_point() else None, non_blocking=True)
            out[k] = v
        return out

    def stats(self, hidden: torch.Tensor, want_argmax: bool = False) -> VocabStats:
        sets = {n: (self.weight[i], None if self.bias is None else self.bias[i]) for n, i in self._set_idx.items()}
        return vocab_stats(hidden, self.weight, self.bias, sets, want_argmax=want_argmax, chunk_elems=self.chunk_elems)

    def _stop_on_nonfinite(self, owners: torch.Tensor, idx: list[int], samples: Sequence[Sample], what: str) -> None:
        """Stop, naming the first sample, when any row had NaN or infinite logits (`owners`: the batch rows
        of those rows); a number computed from them would silently poison a table."""
        if owners.numel():
            s = samples[idx[int(owners[0])]]
            raise NonFiniteLogits(f"sample {s.id!r}: NaN or infinite logits ({what}, {self.dtype}); the weights "
                                  "hold NaN/inf or the arithmetic overflows")

    def plan(self, samples: Sequence[Sample], batch_size: int, with_answer: bool) -> list[list[int]]:
        """Batches of sample indices, longest first, so that padding is small (see `estimate_lengths`).
        The checkpoints of a run share the plan (kept in the encode cache), so LM-only stages also meet
        the same batches in the vision cache."""
        key = None
        if self.cache is not None and all(s.image_ref or s.image is None for s in samples):
            key = (self._proc_key, batch_size, with_answer, tuple(self._key(s, with_answer)[1:] for s in samples))
            if key in self.cache.plans:
                return [list(b) for b in self.cache.plans[key]]
        lengths = estimate_lengths(self.processor, samples, with_answer)
        order = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if key is not None:
            self.cache.plans[key] = [list(b) for b in batches]
        return batches

    # -- the multimodal forward, with cached image features -----------------------------------------
    def _rope_positions(self, batch: dict) -> torch.Tensor | None:
        if hasattr(self.base, "get_rope_index") and batch.get("image_grid_thw") is not None:
            return self._positions(batch)[0]
        return None

    def _image_features(self, samples, idx, batch: dict, image_keys: list[str]) -> torch.Tensor:
        """The batch's image features, concatenated in image order, from the vision cache or computed with
        the model's own `get_image_features` (and stored). Entries are keyed by the batch's images in order:
        the features are then bitwise those the model's forward computes for this very batch (a vision
        batch of other images could differ in the last bit), so cached and uncached runs, and runs with
        any number of processes, give identical numbers; LM-only stages run the same plan, so they hit."""
        vc = self.vision_cache
        images = [samples[i] for i in idx if samples[i].image is not None]
        key = (self._vision_fp, self._proc_key, tuple((s.id, s.image_ref) for s in images)) \
            if all(s.image_ref for s in images) else None
        hit = vc.get(key) if key is not None else None
        if hit is not None:
            vc.hits += len(images)
            return hit.to(self.device, non_blocking=True)
        vc.misses += len(images)
        out = self.base.get_image_features(**{k: batch[k] for k in image_keys}, return_dict=True)
        feats = list(out.pooler_output if hasattr(out, "pooler_output") else out)
        if len(feats) != len(images):
            raise RuntimeError(f"get_image_features gave {len(feats)} feature tensors for {len(images)} images")
        feats = torch.cat(feats)
        if key is not None:
            vc.put(key, feats)
        return feats

    def _lm_inputs(self, samples, idx, batch: dict, image_keys: list[str]) -> dict:
        """Keyword arguments for `self.base`: the batch itself, or (vision cache) input embeddings with the
        image features scattered into the image-token positions exactly as the model's forward does."""
        if self._vision_fp is None or not image_keys:
            return batch
        ids = batch["input_ids"]
        emb = self.base.get_input_embeddings()(ids)
        feats = self._image_features(samples, idx, batch, image_keys).to(emb.device, emb.dtype)
        emb = emb.masked_scatter((ids == self.image_token_id)[..., None].expand_as(emb), feats)
        pos = batch.get("position_ids")
        pos = pos if pos is not None else self._rope_positions(batch)
        out = {"inputs_embeds": emb, "attention_mask": batch["attention_mask"]}
        if pos is not None:
            out["position_ids"] = pos
        return out

    def _check_embeds_path(self, batch: dict, lm: dict) -> bool:
        """Once per process and model class: the embeddings path gives the model's own hidden states."""
        key = (type(self.model).__name__, self.dtype, self.device.type,
               getattr(self.model.config, "_attn_implementation", None))
        if key not in _EMBEDS_PATH_OK:
            ref = self.base(**batch, use_cache=False).last_hidden_state
            got = self.base(**lm, use_cache=False).last_hidden_state
            tol = 1e-5 if self.dtype == torch.float32 else 2e-2
            ok = ref.shape == got.shape and bool((ref - got).abs().max() <= tol * ref.abs().max().clamp(min=1))
            _EMBEDS_PATH_OK[key] = ok
            if not ok:
                warnings.warn(f"{key[0]}: precomputed image features do not reproduce the model's forward with "
                              "this transformers version; the vision cache is off for it", stacklevel=3)
        return _EMBEDS_PATH_OK[key]

    def forward(self, samples, idx, batch: dict, image_keys: list[str], position_ids=None, **kw) -> torch.Tensor:
        """Last hidden states of the multimodal model for one device batch (vision cache when usable)."""
        own = batch if position_ids is None else batch | {"position_ids": position_ids}
        lm = self._lm_inputs(samples, idx, own, image_keys)
        if lm is not own and not self._check_embeds_path(own, lm):
            self._vision_fp = None
            lm = own
        return self.base(**lm, **kw).last_hidden_state

    # -- teacher-forced ----------------------------------------------------------------------------
    @torch.inference_mode()
    def teacher_forced(self, samples: Sequence[Sample], batch_size: int = 32, padding_side: str = "right",
                       batches: list[list[int]] | None = None, progress: bool = False) -> dict[int, dict]:
        """{sample index: {probe: value, "n_positions": int}} for the given samples (or planned batches)."""
        batches = batches if batches is not None else self.plan(samples, batch_size, True)
        out: dict[int, dict] = {}
        bar = tqdm(total=len(batches), desc="teacher-forced", unit="batch", disable=not progress, leave=False)
        for idx, batch, image_keys in self.stream(samples, batches, True, padding_side):
            answer = batch.pop("answer_mask").to(self.device)
            batch.pop("eot_mask")
            hidden = self.forward(samples, idx, self.to_device(batch), image_keys, use_cache=False)
            predicts = torch.zeros_like(answer)
            predicts[:, :-1] = answer[:, 1:]       # position t predicts token t+1
            probes = self.stats(hidden[predicts]).probes()   # rows in (sample, position) order
            seg = predicts.nonzero()[:, 0]
            acc = SampleAccumulator(self.probe_names, len(idx), self.device)
            acc.add(seg, probes)
            self._stop_on_nonfinite(seg[~torch.stack([v.isfinite() for v in probes.values()]).all(0)], idx, samples,
                                    "teacher-forced")
            for i, r in zip(idx, acc.result()):
                out[i] = r
            bar.update()
        bar.close()
        return out

    # -- generation --------------------------------------------------------------------------------
    def _positions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill position ids and each row's next position. Qwen2-VL-style models use 3-D (mrope)
        positions from their own `get_rope_index`; the others count real tokens, so left or right
        padding gives every row the positions it would have alone."""
        mask = batch["attention_mask"]
        if hasattr(self.base, "get_rope_index") and batch.get("image_grid_thw") is not None:
            pos, _ = self.base.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                              image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
            nxt = pos.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
            return pos, nxt
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, mask.long().sum(-1)

    @torch.inference_mode()
    def generate(self, samples: Sequence[Sample], batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS,
                 stats: bool = False, padding_side: str = "left", batches: list[list[int]] | None = None,
                 progress: bool = False) -> list[Generation]:
        """Greedy decoding with a KV cache for each sample's prompt (image + instruction), batched.

        Returns one Generation per sample, in the order of `samples` (or of the planned batches' indices).
        With stats=True each carries the per-sample probe values over its steps (EOS step included).
        """
        from transformers import DynamicCache

        batches = batches if batches is not None else self.plan(samples, batch_size, False)
        stop = torch.tensor(sorted(self.stop_ids), device=self.device)
        done: list[tuple[int, list[int], dict]] = []     # decoded after the loop: the tokenizer stays on one thread
        bar = tqdm(total=len(batches), desc="generate", unit="batch", disable=not progress, leave=False)
        for idx, batch, image_keys in self.stream(samples, batches, False, padding_side):
            for k in MASKS:
                batch.pop(k)
            batch = self.to_device(batch)
            pos, nxt = self._positions(batch)
            mask = batch["attention_mask"]
            B, T = mask.shape
            cache = DynamicCache(config=self.model.config.get_text_config())
            hidden = self.forward(samples, idx, batch, image_keys, position_ids=pos, past_key_values=cache,
                                  use_cache=True)
            last = torch.full((B,), T - 1, device=self.device) if padding_side == "left" else \
                mask.long().sum(-1) - 1
            h = hidden[torch.arange(B, device=self.device), last]
            rows = torch.arange(B, device=self.device)   # active batch rows (finished rows leave)
            out_ids = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=self.device)
            acc = SampleAccumulator(self.probe_names, B, self.device) if stats else None
            bad = torch.zeros(B, dtype=torch.bool, device=self.device)   # rows that met NaN/inf logits
            for step in range(max_new_tokens):
                vs = self.stats(h, want_argmax=True)
                bad[rows] |= ~(vs.lse.isfinite() & vs.entropy.isfinite())
                tok = vs.argmax
                out_ids[rows, step] = tok
                if stats:
                    acc.add(rows, vs.probes())
                ended = torch.isin(tok, stop)
                if step == max_new_tokens - 1:
                    break
                if bool(ended.any()):                  # one host sync per step, as any decoder needs
                    keep = (~ended).nonzero()[:, 0]
                    if keep.numel() == 0:
                        break
                    cache.batch_select_indices(keep)
                    mask, nxt, tok, rows = mask[keep], nxt[keep], tok[keep], rows[keep]
                mask = torch.cat([mask, mask.new_ones(rows.numel(), 1)], dim=1)
                step_pos = (nxt + step)[:, None]
                if pos.dim() == 3:
                    step_pos = step_pos[None].expand(3, -1, -1)
                h = self.base(input_ids=tok[:, None], attention_mask=mask, position_ids=step_pos,
                              past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
            self._stop_on_nonfinite(bad.nonzero()[:, 0], idx, samples, "generation")
            per_sample = acc.result() if stats else [{}] * B
            for j, (i, ids) in enumerate(zip(idx, out_ids.tolist())):
                done.append((i, [t for t in ids if t >= 0], per_sample[j]))
            bar.update()
        bar.close()
        results: dict[int, Generation] = {}
        for i, ids, per in done:
            g = Generation(i, ids, self.tokenizer.decode(ids, skip_special_tokens=True),
                           bool(ids) and ids[-1] in self.stop_ids, n_steps=len(ids))
            if stats:
                g.stats = {k: v for k, v in per.items() if k != "n_positions"}
            results[i] = g
        return [results[i] for i in sorted(results)]


def compile_decoder_layers(model: nn.Module, family) -> None:
    """torch.compile each LM decoder layer in place (regional compilation: one graph serves every layer;
    dynamic shapes, since batches and sequence lengths vary). For GPUs; numerics are the layers' own up to
    kernel fusion, which the GPU parity test bounds."""
    for layer in model.get_submodule(family.layers):
        layer.compile(dynamic=True)


def stop_token_ids(model: nn.Module, processor) -> set[int]:
    """Tokens that end a generated answer: the generation config's and tokenizer's EOS, and the first token
    of the chat template's end of turn when it is a special token (e.g. <|im_end|>)."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    tok = processor.tokenizer
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    try:
        tail = answer_affixes(processor)[1]
        first = tok(tail, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tok.all_special_ids):
            ids.add(first[0])
    except Exception:  # a template without an assistant turn: EOS alone
        pass
    if not ids:
        raise ValueError("no stop token: neither the generation config nor the tokenizer names an EOS token")
    return ids


def estimate_lengths(processor, samples: Sequence[Sample], with_answer: bool) -> list[int]:
    """Token counts for sorting: text tokens plus image tokens from the image header (the processor's
    own count where it has one), without decoding any image."""
    tok = processor.tokenizer
    texts = [s.instruction + (" " + (s.caption or "") if with_answer else "") for s in samples]
    text_len = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    sizes = [s.image_size() for s in samples]
    image_len = [0] * len(samples)
    with_image = [i for i, sz in enumerate(sizes) if sz]
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if with_image and counter is not None:
        try:
            counts = counter(image_sizes=[sizes[i] for i in with_image]).num_image_tokens
            for i, c in zip(with_image, counts):
                image_len[i] = int(c)
        except Exception:  # a processor without a usable count: sort by text, then image area
            for i in with_image:
                image_len[i] = int(math.sqrt(sizes[i][0] * sizes[i][1]))
    return [a + b for a, b in zip(text_len, image_len)]
