"""Which checkpoints a directory holds, in stage order.

- RUN/run.json (DESIGN.md): its "stages" [{"index", "name", "task", "path"}], plus "recipe", "captions".
- otherwise DIR itself when it is a checkpoint, else its sub-folders that are checkpoints: full HF folders,
  deltas, PEFT adapters, Trainer `checkpoint-N` folders; in natural order (checkpoint-500 before
  checkpoint-1000), numbered 0, 1, ... as stages.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.checkpoints import is_stage
from training.manifest import RUN_JSON, ManifestError, read_stages, run_captions


class DiscoveryError(ValueError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    stage: int
    stage_name: str
    task: str | None
    path: Path       # where it is
    rel: str         # what the table's `checkpoint` column records: the path relative to the run directory


@dataclass
class RunDir:
    root: Path
    name: str
    recipe: str | None
    checkpoints: list[Checkpoint]
    captions: dict | None = None             # run.json "captions": {"path", "images"}, paths resolved
    manifest: dict = field(default_factory=dict)


def natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _from_run_json(root: Path) -> RunDir:
    try:
        man = read_stages(root)
    except ManifestError as e:
        raise DiscoveryError(str(e)) from None
    cks = []
    for s in man["stages"]:
        rel = str(s["path"])
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        cks.append(Checkpoint(int(s["index"]), str(s["name"]), s.get("task"), p, rel))
    return RunDir(root, str(man.get("name") or root.name), man.get("recipe"), cks,
                  run_captions(man, root), man)


def discover(ckpt_dir: str | os.PathLike) -> RunDir:
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise DiscoveryError(f"{root}: --ckpt-dir does not exist or is not a directory")
    if (root / RUN_JSON).is_file():
        return _from_run_json(root)
    if is_stage(root):
        return RunDir(root, root.name, None, [Checkpoint(0, root.name, None, root, ".")])
    subs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and is_stage(d)),
                  key=lambda d: natural_key(d.name))
    if not subs:
        raise DiscoveryError(f"{root}: no checkpoints found (looked for run.json, and for sub-folders that are "
                             "Hugging Face checkpoints, Trainer checkpoint-N folders, PEFT adapters or deltas)")
    return RunDir(root, root.name, None, [Checkpoint(i, d.name, None, d, d.name) for i, d in enumerate(subs)])
