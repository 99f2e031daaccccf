"""Drift of a checkpoint's output distribution from a base model's, teacher-forced on captions, exact.

At every caption position (the positions the number-token probe scores), with base logits b and checkpoint
logits c over the whole output vocabulary V:

    kl_to_base     = KL(p_b || p_c) = sum_i p_b,i (log p_b,i - log p_c,i)                 (nats)
                   = E_{p_b}[b - c] - logsumexp(b) + logsumexp(c)
    top1_agreement = 1 if argmax b == argmax c else 0          (first index among ties, as greedy decoding)

Per sample both are averaged over its positions, then summarised over samples like every other probe
(docs/probes.md). The base and the checkpoint run over the SAME batches (same samples, same padding), each
with its own output projection; nothing of vocabulary size is stored: for a block of rows, both models'
logits are made one vocabulary chunk at a time by `probes.vocab`'s reducer (the projection in the model's
dtype, the rest in fp64) and the KL is accumulated online on its log-sum-exp (running max m_b,
S = sum e^(b - m_b), T = sum e^(b - m_b) (b - c), both rescaled when m_b grows; KL = T/S - lse_b + lse_c),
so memory is bounded by `chunk_elems` like the engine's statistics. A checkpoint identical to the base
gives KL exactly 0 and agreement exactly 1.

Both models run through the engine's forward (`probes.forward`: the caption positions, the vision cache
when the engines have one). The base's hidden states at the caption positions are cached per batch
(bounded by `max_bytes`); once every batch is cached the base model itself is released and only its output
projection is kept.

    ref = BaseReference(base_model, processor)
    per_sample = teacher_forced(Engine(ckpt_model, processor), ref, samples, batches)
    per_sample[0]["kl_to_base"], per_sample[0]["top1_agreement"], per_sample[0]["number_mass"]

probes.monitor runs these probes on a small fixed caption set for a model that is being trained (the
drift monitor of `training.run`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .batching import EncodeCache
from .captions import Sample
from .engine import Engine
from .stats import SampleAccumulator
from .vision_cache import VisionCache
from .vocab import DEFAULT_CHUNK_ELEMS, Argmax, Chunk, Counter, Head, LogSumExp, block_shape, reduce_vocab

DRIFT_PROBES = ("kl_to_base", "top1_agreement")


class DriftError(ValueError):
    """Bad drift / signature options; the message names the input."""


# -- the exact pairwise statistics -----------------------------------------------------------------
class KLToBase:
    """A `probes.vocab` accumulator over (base, checkpoint) heads: KL(p_b || p_c) = T / S - lse_b + lse_c
    with T = sum e^(b - m_b) (b - c), rescaled like S when m_b grows."""

    def __init__(self):
        self.t = None

    def add(self, chunks: Sequence[Chunk]) -> None:
        b, c = chunks
        part = (b.e * (b.z - c.z)).sum(1, dtype=torch.float64)
        self.t = part if b.alpha is None else b.alpha * self.t + part

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        kl = self.t / lse[0].s - lse[0].value() + lse[1].value()
        return {"kl": kl.clamp(min=0.0)}                   # KL >= 0; rounding may leave -1e-16


def pair_stats(hb: torch.Tensor, wb: torch.Tensor, bb: torch.Tensor | None, hc: torch.Tensor, wc: torch.Tensor,
               bc: torch.Tensor | None, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
               counter: Counter | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_b || p_c) per row in fp64, top-1 agreement per row as bool) for base rows `hb` through (wb, bb)
    and checkpoint rows `hc` through (wc, bc); at most ~chunk_elems logits of each model at once."""
    if hb.shape[0] != hc.shape[0] or wb.shape[0] != wc.shape[0]:
        raise ValueError(f"pair_stats: base {tuple(hb.shape)} x {tuple(wb.shape)} and checkpoint "
                         f"{tuple(hc.shape)} x {tuple(wc.shape)} do not pair up")
    rows, cols = block_shape(hb.shape[0], wb.shape[0], chunk_elems, heads=2)
    heads = [Head(wb, bb, torch.float64), Head(wc, bc, torch.float64)]
    out = reduce_vocab([hb, hc], heads, lambda: [KLToBase(), Argmax(0, "top_b"), Argmax(1, "top_c")],
                       rows=rows, cols=cols, counter=counter)
    return out["kl"], out["top_b"] == out["top_c"]


# -- running models over the caption positions -----------------------------------------------------
def _batch_key(samples: Sequence[Sample], idx: list[int], padding_side: str) -> tuple:
    return (padding_side,) + tuple((samples[i].id, samples[i].image_ref or id(samples[i].image),
                                    samples[i].instruction, samples[i].caption) for i in idx)


class BaseReference:
    """The base model's side of the drift probes: hidden states at the caption positions per batch
    (cached up to `max_bytes`) and its output projection."""

    def __init__(self, model: nn.Module, processor, *, encode_cache: EncodeCache | None = None,
                 vision_cache: VisionCache | None = None, max_bytes: int = 1 << 30, name: str = "base"):
        self.engine = Engine(model, processor, token_sets=(), encode_cache=encode_cache, vision_cache=vision_cache)
        self.weight, self.bias = self.engine.weight, self.engine.bias
        self.max_bytes, self.bytes, self.cache, self.overflow = max_bytes, 0, {}, False
        self.name = name

    @torch.inference_mode()
    def rows(self, samples: Sequence[Sample], idx: list[int], padding_side: str = "right",
             prepared: tuple[dict, list[str]] | None = None) -> torch.Tensor:
        """The base's caption rows of batch `idx`; `prepared`: its (CPU batch, image keys) when the caller
        has them (else the base's engine prepares them)."""
        key = _batch_key(samples, idx, padding_side)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.engine is None:
            raise RuntimeError(f"{self.name}: the base model was released but batch {idx[:4]}... is not cached")
        batch, keys = prepared or self.engine.inputs.prepare(samples, idx, True, padding_side)[1:]
        h, _ = self.engine.forward.caption_rows(samples, idx, batch, keys)
        size = h.numel() * h.element_size()
        if self.bytes + size <= self.max_bytes:
            self.cache[key] = h
            self.bytes += size
        else:
            self.overflow = True
        return h

    def release_model(self) -> bool:
        """Drop the base model when every batch seen so far is cached (keeps its output projection)."""
        if self.engine is not None and not self.overflow and self.cache:
            self.engine = None
            return True
        return False


@torch.inference_mode()
def teacher_forced(eng: Engine, ref: BaseReference, samples: Sequence[Sample], batches: list[list[int]],
                   padding_side: str = "right", progress: bool = False) -> dict[int, dict]:
    """{sample index: {probe: value, "n_positions": n}}: the engine's probes (token sets, entropy) plus
    kl_to_base and top1_agreement, from one checkpoint forward per batch."""
    names = list(eng.probe_names) + list(DRIFT_PROBES)
    out: dict[int, dict] = {}
    bar = tqdm(total=len(batches), desc="teacher-forced + drift", unit="batch", disable=not progress, leave=False)
    for idx, batch, keys in eng.stream(samples, batches, True, padding_side):
        hc, seg = eng.forward.caption_rows(samples, idx, batch, keys)
        hb = ref.rows(samples, idx, padding_side, (batch, keys)).to(hc.device)
        if hb.shape != hc.shape:
            raise RuntimeError(f"base and checkpoint disagree on the caption positions of batch {idx[:4]}... "
                               f"({tuple(hb.shape)} vs {tuple(hc.shape)}): do they share a processor?")
        probes = eng.stats(hc).probes()
        kl, agree = pair_stats(hb, ref.weight, ref.bias, hc, eng.weight, eng.bias, eng.chunk_elems, eng.counter)
        probes["kl_to_base"], probes["top1_agreement"] = kl, agree.double()
        acc = SampleAccumulator(names, len(idx), eng.device)
        acc.add(seg, probes)
        for i, r in zip(idx, acc.result()):
            out[i] = r
        bar.update()
    bar.close()
    return out
