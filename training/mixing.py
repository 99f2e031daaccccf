"""Data-hybrid training: each stage's data is its task plus a share of other data, drawn deterministically.

With `mix.share` s > 0, stage k trains on its task's N examples plus M = round(N * s / (1 - s)) examples
drawn from the pool `mix.sources` (task names; `previous` = the run's tasks before stage k, e.g. `pretrain`
= the embedded world's pretraining set of captions and general QA), so that they are a share s of the
stage's examples. The pool's examples are taken in a random order without repetition (each pool example
once before any repeats), seeded by (seed, stage) only, so a resumed run draws the same examples.
A stage whose pool is empty (stage 1 with only `previous`) trains on its task alone.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from .data import ConversationDataset, TaskFiles

PREVIOUS = "previous"
MIX_STREAM = 0x4D4958  # separates this random stream from the data order's (seed, stage[, epoch])


def pool_names(sources: list[str], tasks: list[str], stage: int) -> list[str]:
    """The task names stage `stage` (1-based) mixes in, in order, each once; never the stage's own task."""
    names: list[str] = []
    for s in sources:
        for name in (tasks[:stage - 1] if s == PREVIOUS else [s]):
            if name not in names and name != tasks[stage - 1]:
                names.append(name)
    return names


def draw(n_current: int, pool_size: int, share: float, seed: int, stage: int) -> list[int]:
    """Indices into the pool: M = round(n_current * share / (1 - share)) of them."""
    if share <= 0 or pool_size == 0:
        return []
    m = round(n_current * share / (1 - share))
    rng = np.random.default_rng(np.random.SeedSequence([seed, stage, MIX_STREAM]))
    out: list[int] = []
    while len(out) < m:
        out.extend(rng.permutation(pool_size).tolist())
    return out[:m]


def stage_dataset(current: TaskFiles, pool: list[TaskFiles], processor, *, share: float, seed: int, stage: int,
                  max_examples: int | None = None) -> tuple[Dataset, dict[str, int]]:
    """(the stage's dataset, {source task: examples drawn from it})."""
    data = ConversationDataset.from_task(current, processor, max_examples)
    if share <= 0 or not pool:
        return data, {}
    parts = [ConversationDataset.from_task(t, processor, max_examples) for t in pool]
    idx = draw(len(data), sum(len(p) for p in parts), share, seed, stage)
    bounds = np.cumsum([0] + [len(p) for p in parts])
    counts = {t.name: int(((np.array(idx) >= lo) & (np.array(idx) < hi)).sum())
              for t, lo, hi in zip(pool, bounds[:-1], bounds[1:])}
    return ConcatDataset([data, Subset(ConcatDataset(parts), idx)]), counts
