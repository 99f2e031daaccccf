"""Which checkpoints a directory holds, in stage order.

- RUN/run.json (DESIGN.md): its "stages" [{"index", "name", "task", "path"}], plus "recipe", "captions".
- otherwise DIR itself when it is a checkpoint, else its sub-folders that are checkpoints: full HF folders,
  deltas, PEFT adapters, Trainer `checkpoint-N` folders; in natural order (checkpoint-500 before
  checkpoint-1000), numbered 0, 1, ... as stages.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from training.checkpoints import is_stage

RUN_JSON = "run.json"


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
    f = root / RUN_JSON
    try:
        man = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DiscoveryError(f"{f}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except OSError as e:
        raise DiscoveryError(f"{f}: cannot read ({e})") from e
    stages = man.get("stages") if isinstance(man, dict) else None
    if not isinstance(stages, list) or not stages:
        raise DiscoveryError(f"{f}: needs a non-empty 'stages' list of {{index, name, task, path}}")
    cks = []
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or not {"index", "name", "path"} <= set(s):
            raise DiscoveryError(f"{f}: stage {i} needs 'index', 'name' and 'path'")
        rel = str(s["path"])
        p = Path(rel) if Path(rel).is_absolute() else root / rel
        cks.append(Checkpoint(int(s["index"]), str(s["name"]), s.get("task"), p, rel))
    caps = man.get("captions")
    if isinstance(caps, dict) and caps.get("path"):
        caps = {k: (str(root / v) if k in ("path", "images") and v and not Path(v).is_absolute() else v)
                for k, v in caps.items()}
    else:
        caps = None
    return RunDir(root, str(man.get("name") or root.name), man.get("recipe"), cks, caps, man)


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
