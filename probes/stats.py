"""The probe statistics of output distributions, per row and per sample.

Per position (or step) with logits z over the whole output vocabulary V and a token set S:
  {S}_mass     = sum_{i in S} softmax(z)_i = exp(logsumexp(z_S) - logsumexp(z))
  {S}_max_prob = max_{i in S} softmax(z)_i
  entropy      = -sum_i p_i log p_i (nats)
Per sample: mass and entropy are averaged over the sample's positions (steps); max_prob is the maximum
over them (the largest single token-set probability the sample shows). Across samples see `probes.table`.
The vocabulary-wide sums run in chunks (`probes.vocab`); the token sets are small and taken whole.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .vocab import (
    DEFAULT_CHUNK_ELEMS,
    Argmax,
    Chunk,
    Counter,
    Head,
    LogSumExp,
    LogSumExpOf,
    block_shape,
    reduce_vocab,
)


class NonFiniteLogits(ValueError):
    """NaN or infinite logits: the message names the sample; probes.run / probes.evaluate add the checkpoint."""


def probe_names(set_names: Iterable[str]) -> list[str]:
    names = []
    for s in set_names:
        names += [f"{s}_mass", f"{s}_max_prob"]
    return names + ["entropy"]


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


class Entropy:
    """-sum p log p per row, online: with t = sum e^(z-m)(z-m), H = log s - t / s; when m grows,
    t' = alpha (t + s shift)."""

    def __init__(self):
        self.t = None

    def add(self, chunks: Sequence[Chunk]) -> None:
        c = chunks[0]
        part = (c.e * c.d).sum(1, dtype=torch.float64)
        self.t = part if c.alpha is None else c.alpha * (self.t + c.s_before * c.shift) + part

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        s = lse[0].s
        return {"entropy": torch.log(s) - self.t / s}


def vocab_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                sets: dict[str, tuple[torch.Tensor, torch.Tensor | None]], *, want_argmax: bool = False,
                chunk_elems: int = DEFAULT_CHUNK_ELEMS, counter: Counter | None = None) -> VocabStats:
    """Statistics of softmax(hidden @ weight.T + bias) per row, never holding more than ~chunk_elems logits;
    `sets`: each token set's rows of the projection. Exponentials in fp32, per-row sums in fp64."""
    rows, cols = block_shape(hidden.shape[0], weight.shape[0], chunk_elems)
    accs = lambda: [LogSumExpOf(), Entropy()] + ([Argmax()] if want_argmax else [])  # noqa: E731
    out = reduce_vocab([hidden], [Head(weight, bias, torch.float32)], accs, rows=rows, cols=cols, counter=counter)
    set_lse, set_max = {}, {}
    for name, (w, b) in sets.items():
        z = hidden @ w.T
        if b is not None:
            z = z + b
        z = z.double()
        set_lse[name] = torch.logsumexp(z, dim=1)
        set_max[name] = z.max(dim=1).values
    return VocabStats(out["lse"], out["entropy"], set_lse, set_max, out.get("argmax"))


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
