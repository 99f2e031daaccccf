"""Reductions over the whole output vocabulary, in chunks: one reducer, one online log-sum-exp, pluggable
accumulators.

For a block of rows, each head's logits (rows x a chunk of the vocabulary) are made one chunk at a time, so
memory is bounded by the block, never by rows x vocabulary. Per head and row, `LogSumExp` keeps the running
max m and s = sum e^(z - m), rescaled by alpha = e^(m_old - m_new) whenever m grows; each chunk is handed,
as folded in, to the accumulators, which keep their own sums on the same running max:

    probes.stats   entropy (t = sum e^(z-m)(z-m)) and the greedy token (`Argmax`)
    probes.drift   KL(base || checkpoint) (T = sum e^(b-m_b)(b-c)) and top-1 agreement, two heads
    probes.layers  E_p[W] (the softmax-weighted unembedding rows), for the layers' log-mass direction

The projection runs in the weights' dtype (as the model's own head), the element-wise work in the head's
`dtype` and the per-row sums in fp64 (a few numbers per row: rounding does not grow with the vocabulary).
A `counter` passed in is told of every logits block made (its rows, columns and width), e.g. to count FLOPs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

DEFAULT_CHUNK_ELEMS = 1 << 24      # logits held at once (64 MiB in fp32)


class Counter(Protocol):
    def add_logits(self, rows: int, cols: int, width: int) -> None:
        """One block of rows x cols logits was made from width-dimensional rows."""


@dataclass(frozen=True)
class Head:
    """An output projection: logits = h @ weight.T + bias, reduced in `dtype`."""
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32

    def logits(self, h: torch.Tensor, c0: int, c1: int, counter: Counter | None = None) -> torch.Tensor:
        """The logits of rows `h` for vocabulary entries c0:c1 (the only place vocabulary-wide logits are made)."""
        w = self.weight[c0:c1]
        z = h.to(w.dtype) @ w.T
        if self.bias is not None:
            z = z + self.bias[c0:c1]
        if counter is not None:
            counter.add_logits(h.shape[0], w.shape[0], h.shape[1])
        return z.to(self.dtype)


def block_shape(n_rows: int, vocab: int, chunk_elems: int, heads: int = 1) -> tuple[int, int]:
    """(rows, columns) of square-ish logits blocks holding at most ~chunk_elems values per head alive at
    once (4096 x 4096 by default)."""
    per = max(1, chunk_elems // heads)
    rows = max(1, min(n_rows, math.isqrt(per)))
    return rows, max(1, min(vocab, per // rows))


@dataclass
class Chunk:
    """One head's logits chunk as the log-sum-exp folded it in (vocabulary entries c0:c1)."""
    z: torch.Tensor                    # logits, rows x (c1 - c0)
    zmax: torch.Tensor                 # their max per row
    zarg: torch.Tensor                 # its index within the chunk (first among ties)
    d: torch.Tensor                    # z - m (m: the running max after this chunk)
    e: torch.Tensor                    # exp(d)
    shift: torch.Tensor | None         # m_old - m_new in fp64 (None for the first chunk)
    alpha: torch.Tensor | None         # exp(shift): the factor every running sum is rescaled by
    s_before: torch.Tensor | None      # s before this chunk
    c0: int
    c1: int


class LogSumExp:
    """Per row, the running max m and s = sum e^(z - m) over the chunks seen."""

    def __init__(self):
        self.m = self.s = None

    def add(self, z: torch.Tensor, c0: int, c1: int) -> Chunk:
        zmax, zarg = z.max(dim=1)
        if self.m is None:
            m, shift, alpha, s_before = zmax, None, None, None
            d = z - m[:, None]
            e = torch.exp(d)
            self.s = e.sum(1, dtype=torch.float64)
        else:
            m = torch.maximum(self.m, zmax)
            shift = (self.m - m).double()
            alpha = torch.exp(shift)
            d = z - m[:, None]
            e = torch.exp(d)
            s_before = self.s
            self.s = alpha * self.s + e.sum(1, dtype=torch.float64)
        self.m = m
        return Chunk(z, zmax, zarg, d, e, shift, alpha, s_before, c0, c1)

    def value(self) -> torch.Tensor:
        """logsumexp over everything seen, fp64."""
        return self.m.double() + torch.log(self.s)


class Accumulator(Protocol):
    def add(self, chunks: Sequence[Chunk]) -> None:
        """One vocabulary chunk of every head (in the order of the reducer's heads)."""

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        """Per-row values once the whole vocabulary is seen (`lse`: each head's log-sum-exp)."""


class Argmax:
    """A head's greedy token per row: the first index among ties (an earlier chunk wins ties)."""

    def __init__(self, head: int = 0, key: str = "argmax"):
        self.head, self.key = head, key
        self.best = self.index = None

    def add(self, chunks: Sequence[Chunk]) -> None:
        c = chunks[self.head]
        if self.best is None:
            self.best, self.index = c.zmax, c.zarg + c.c0
            return
        better = c.zmax > self.best                 # strict: an earlier chunk wins ties
        self.best = torch.where(better, c.zmax, self.best)
        self.index = torch.where(better, c.zarg + c.c0, self.index)

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        return {self.key: self.index}


class LogSumExpOf:
    """A head's logsumexp per row (fp64) as a result."""

    def __init__(self, head: int = 0, key: str = "lse"):
        self.head, self.key = head, key

    def add(self, chunks: Sequence[Chunk]) -> None:
        pass

    def result(self, lse: Sequence[LogSumExp]) -> dict[str, torch.Tensor]:
        return {self.key: lse[self.head].value()}


def reduce_vocab(hidden: Sequence[torch.Tensor], heads: Sequence[Head],
                 accumulators: Callable[[], Sequence[Accumulator]], *, rows: int, cols: int,
                 counter: Counter | None = None) -> dict[str, torch.Tensor]:
    """Per-row results of fresh `accumulators()` for every block of `rows` rows, concatenated; head k reads
    the rows of hidden[k] (all of the same length, paired row by row), `cols` vocabulary entries at a time."""
    n, vocab = hidden[0].shape[0], heads[0].weight.shape[0]
    parts: dict[str, list[torch.Tensor]] = {}
    for r0 in range(0, max(n, 1), rows):       # no rows: one empty block, so every result has its dtype
        hs = [h[r0:r0 + rows] for h in hidden]
        lse = [LogSumExp() for _ in heads]
        accs = accumulators()
        for c0 in range(0, vocab, cols):
            c1 = min(c0 + cols, vocab)
            chunks = [s.add(head.logits(h, c0, c1, counter), c0, c1) for s, head, h in zip(lse, heads, hs)]
            for acc in accs:
                acc.add(chunks)
        for acc in accs:
            for k, v in acc.result(lse).items():
                parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}
