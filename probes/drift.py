"""Drift of a checkpoint's output distribution from a base model's, teacher-forced on captions, exact.

At every caption position (the positions the number-token probe scores), with base logits b and checkpoint
logits c over the whole output vocabulary V:

    kl_to_base     = KL(p_b || p_c) = sum_i p_b,i (log p_b,i - log p_c,i)                 (nats)
                   = E_{p_b}[b - c] - logsumexp(b) + logsumexp(c)
    top1_agreement = 1 if argmax b == argmax c else 0          (first index among ties, as greedy decoding)

Per sample both are averaged over its positions, then summarised over samples like every other probe
(docs/probes.md). The base and the checkpoint run over the SAME batches (same samples, same padding), each
with its own output projection; nothing of vocabulary size is stored: for a block of rows, both models'
logits are made one vocabulary chunk at a time (the projection in the model's dtype, the rest in fp64)
and the KL is accumulated online (running max m_b,
S = sum e^(b - m_b), T = sum e^(b - m_b) (b - c), both rescaled when m_b grows; KL = T/S - lse_b + lse_c),
so memory is bounded by `chunk_elems` like the engine's log-sum-exp. A checkpoint identical to the base
gives KL exactly 0 and agreement exactly 1.

The base's hidden states at the caption positions are cached per batch (bounded by `max_bytes`); once every
batch is cached the base model itself is released and only its output projection is kept.

    ref = BaseReference(base_model, processor)
    per_sample = teacher_forced(Engine(ckpt_model, processor), ref, samples, batches)
    per_sample[0]["kl_to_base"], per_sample[0]["top1_agreement"], per_sample[0]["number_mass"]

probes.monitor runs these probes on a small fixed caption set for a model that is being trained (the
drift monitor of `training.run`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from training.chat import collate

from .captions import Sample
from .engine import DEFAULT_CHUNK_ELEMS, EncodeCache, Engine, SampleAccumulator

DRIFT_PROBES = ("kl_to_base", "top1_agreement")


class DriftError(ValueError):
    """Bad drift / signature options; the message names the input."""


# -- the exact pairwise statistics -----------------------------------------------------------------
def _block(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """One block of logits: the projection in the weights' dtype (as the model's own head), then fp64 for
    the element-wise work (negligible next to the matmul; KL is a difference of nearly equal sums)."""
    z = h @ w.T
    if b is not None:
        z = z + b
    return z.double()


def pair_stats(hb: torch.Tensor, wb: torch.Tensor, bb: torch.Tensor | None, hc: torch.Tensor, wc: torch.Tensor,
               bc: torch.Tensor | None, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p_b || p_c) per row in fp64, top-1 agreement per row as bool) for base rows `hb` through (wb, bb)
    and checkpoint rows `hc` through (wc, bc); at most ~chunk_elems logits of each model at once."""
    if hb.shape[0] != hc.shape[0] or wb.shape[0] != wc.shape[0]:
        raise ValueError(f"pair_stats: base {tuple(hb.shape)} x {tuple(wb.shape)} and checkpoint "
                         f"{tuple(hc.shape)} x {tuple(wc.shape)} do not pair up")
    N, V = hb.shape[0], wb.shape[0]
    per = max(1, chunk_elems // 2)                      # two blocks (base and checkpoint) are alive at once
    rows = max(1, min(N, math.isqrt(per)))
    cols = max(1, min(V, per // rows))
    kls, agree = [hb.new_zeros(0, dtype=torch.float64)], [torch.zeros(0, dtype=torch.bool, device=hb.device)]
    for r0 in range(0, N, rows):
        xb, xc = hb[r0:r0 + rows], hc[r0:r0 + rows]
        mb = mc = sb = sc = t = best_b = arg_b = best_c = arg_c = None
        for c0 in range(0, V, cols):
            sl = slice(c0, c0 + cols)
            zb = _block(xb, wb[sl], None if bb is None else bb[sl])
            zc = _block(xc, wc[sl], None if bc is None else bc[sl])
            cmb, cib = zb.max(dim=1)
            cmc, cic = zc.max(dim=1)
            if mb is None:
                mb, mc = cmb, cmc
                eb = torch.exp(zb - mb[:, None])
                sb = eb.sum(1, dtype=torch.float64)
                t = (eb * (zb - zc)).sum(1, dtype=torch.float64)
                sc = torch.exp(zc - mc[:, None]).sum(1, dtype=torch.float64)
                best_b, arg_b, best_c, arg_c = cmb, cib, cmc, cic
                continue
            nb, nc = torch.maximum(mb, cmb), torch.maximum(mc, cmc)
            ab, ac = torch.exp(mb - nb), torch.exp(mc - nc)
            eb = torch.exp(zb - nb[:, None])
            sb = ab * sb + eb.sum(1, dtype=torch.float64)
            t = ab * t + (eb * (zb - zc)).sum(1, dtype=torch.float64)
            sc = ac * sc + torch.exp(zc - nc[:, None]).sum(1, dtype=torch.float64)
            mb, mc = nb, nc
            gb, gc = cmb > best_b, cmc > best_c           # strict: an earlier chunk wins ties
            best_b, arg_b = torch.where(gb, cmb, best_b), torch.where(gb, cib + c0, arg_b)
            best_c, arg_c = torch.where(gc, cmc, best_c), torch.where(gc, cic + c0, arg_c)
        kl = t / sb - (mb + torch.log(sb)) + (mc + torch.log(sc))
        kls.append(kl.clamp(min=0.0))                     # KL >= 0; rounding may leave -1e-16
        agree.append(arg_b == arg_c)
    return torch.cat(kls), torch.cat(agree)


# -- running models over the caption positions -----------------------------------------------------
def caption_rows(eng: Engine, samples: Sequence[Sample], idx: list[int],
                 padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states at the positions that predict caption tokens, in (sample, position) order;
    the batch-local sample of each row) for one batch, as `Engine.teacher_forced` computes them."""
    exs = [eng.encode(samples[i], True) for i in idx]
    batch = collate(exs, eng.family, eng.pad_id, padding_side)
    answer = batch.pop("answer_mask").to(eng.device)
    batch.pop("eot_mask")
    hidden = eng.base(**eng.to_device(batch), use_cache=False).last_hidden_state
    predicts = torch.zeros_like(answer)
    predicts[:, :-1] = answer[:, 1:]                     # position t predicts token t+1
    return hidden[predicts], predicts.nonzero()[:, 0]


def _batch_key(samples: Sequence[Sample], idx: list[int], padding_side: str) -> tuple:
    return (padding_side,) + tuple((samples[i].id, samples[i].image_ref or id(samples[i].image),
                                    samples[i].instruction, samples[i].caption) for i in idx)


class BaseReference:
    """The base model's side of the drift probes: hidden states at the caption positions per batch
    (cached up to `max_bytes`) and its output projection."""

    def __init__(self, model: nn.Module, processor, *, encode_cache: EncodeCache | None = None,
                 max_bytes: int = 1 << 30, name: str = "base"):
        self.engine = Engine(model, processor, token_sets=(), encode_cache=encode_cache)
        self.weight, self.bias = self.engine.weight, self.engine.bias
        self.max_bytes, self.bytes, self.cache, self.overflow = max_bytes, 0, {}, False
        self.name = name

    @torch.inference_mode()
    def rows(self, samples: Sequence[Sample], idx: list[int], padding_side: str = "right") -> torch.Tensor:
        key = _batch_key(samples, idx, padding_side)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.engine is None:
            raise RuntimeError(f"{self.name}: the base model was released but batch {idx[:4]}... is not cached")
        h, _ = caption_rows(self.engine, samples, idx, padding_side)
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
    for idx in tqdm(batches, desc="teacher-forced + drift", unit="batch", disable=not progress, leave=False):
        hc, seg = caption_rows(eng, samples, idx, padding_side)
        hb = ref.rows(samples, idx, padding_side).to(hc.device)
        if hb.shape != hc.shape:
            raise RuntimeError(f"base and checkpoint disagree on the caption positions of batch {idx[:4]}... "
                               f"({tuple(hb.shape)} vs {tuple(hc.shape)}): do they share a processor?")
        probes = eng.stats(hc).probes()
        kl, agree = pair_stats(hb, ref.weight, ref.bias, hc, eng.weight, eng.bias, eng.chunk_elems)
        probes["kl_to_base"], probes["top1_agreement"] = kl, agree.double()
        acc = SampleAccumulator(names, len(idx), eng.device)
        acc.add(seg, probes)
        for i, r in zip(idx, acc.result()):
            out[i] = r
    return out
