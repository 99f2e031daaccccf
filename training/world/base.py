"""The world's pretrained base model: built on first use through the project's own loop, then cached.

    base_checkpoint("qwen2_5_vl", "toy", train=training.run.run_in_processes)   # <cache>/base/v2/qwen2_5_vl-toy, a full
                                                                   # HF checkpoint folder

Building it = `init_checkpoint` (random weights + the world tokenizer/processor), then `train` (the loop's
`training.run.run_in_processes`, passed in by its caller: the world sits below the loop) runs with recipe `full`, each
starting from the previous one's checkpoint (PRETRAIN_PLAN):

    toy:  world-pretrain-warmup.yaml over tasks/pretrain_warmup (lone objects: "what shape?" / "what colour?"), then
          world-pretrain.yaml over tasks/pretrain (captions + held-out train splits, never a target)
    tiny: world-pretrain-tiny.yaml over tasks/pretrain

Why the warm-up: from scratch, the tiny vision tower learns colour, background and size within a few
hundred steps of the mixture but not shape within 1,200. A warm-up on shapes alone gave a base whose
colour and shape answers depended on the seed and the machine (by up to 45 points); this one, shapes and
colours of lone objects, gives the same abilities for every seed (docs/world.md has the measurements).

The result folder also holds `world_base.json` (settings, timing, quick-check scores against chance)
and `pretrain_log.jsonl` (every phase's training log, each line tagged with its phase).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..checkpoints import atomic_dir, is_checkpoint, load_model, load_processor
from ..families import get_family
from ..manifest import read_stages
from .build import PRETRAIN_VERSION, VERSION, cache_root, ensure_world, load_world
from .models import WORLD_OF_SIZE, init_checkpoint, model_size
from .registry import HELDOUT_TASKS, TARGET_TASKS, TRANSFER_TASKS

BASE_JSON = "world_base.json"
# (config in training/configs, task) per phase
PRETRAIN_PLAN = {"toy": [("world-pretrain-warmup", "pretrain_warmup"), ("world-pretrain", "pretrain")],
                 "tiny": [("world-pretrain-tiny", "pretrain")]}
# Processes of one CPU thread each that train a base model (training.run.run_in_processes): 2 use two
# cores about 1.7x better than one process's two threads; part of the plan, since the float sums differ.
PRETRAIN_PROCESSES = {"toy": 2, "tiny": 1}
# training.run.run_in_processes: (config, config name, processes) -> the run directory
Train = Callable[..., Path]


def base_dir(family: str, size: str) -> Path:
    return cache_root() / "base" / f"v{PRETRAIN_VERSION}" / f"{family}-{size}"


def plan_fingerprint(family: str, size: str) -> str:
    """What a base model is built from: the plan's config files, the model size, the pretraining data's version. A cached
    base model with another fingerprint is rebuilt, so an edited world-pretrain.yaml takes effect."""
    from ..config import resolve_path

    configs = [yaml.safe_load(resolve_path(config).read_text()) for config, _ in PRETRAIN_PLAN[size]]  # not comments
    key = [family, size, model_size(size), PRETRAIN_VERSION, PRETRAIN_PLAN[size], configs, PRETRAIN_PROCESSES[size]]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_built(path: str | os.PathLike, fingerprint: str | None = None) -> bool:
    """A finished base model folder (and, given `fingerprint`, one built from that plan)."""
    if not (is_checkpoint(path) and (Path(path) / BASE_JSON).is_file()):
        return False
    return fingerprint is None or json.loads((Path(path) / BASE_JSON).read_text()).get("plan") == fingerprint


def pretrain(family: str, size: str, out: str | os.PathLike, train: Train, *,
             world: str | os.PathLike | None = None, overrides: list[str] = (), quick_check: bool = True,
             seed: int = 0) -> Path:
    """Pretrain a base model from scratch into `out` (atomically) through `train` (training.run.run); returns
    `out`. `seed` draws the initial weights and every phase's data order (the cached base is seed 0;
    scripts/base_seeds.py builds others to measure how much the base depends on it)."""
    from ..config import load_config

    model_size(size)
    world = Path(world or ensure_world(size=WORLD_OF_SIZE[size]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        ckpt = init_checkpoint(family, size, work / "init", world=world, seed=seed)
        phases, logs = [], []
        for i, (config, task) in enumerate(PRETRAIN_PLAN[size]):
            # one mapping: separate .train / .images overrides would reset each other (training.config.apply)
            files = ([f"data.tasks.{task}={{train: '{world / info_key(world, task)}', images: '{world / 'images'}'}}"]
                     if task != "pretrain" else [])
            # progress bars on (the minutes of a base build are visible; make demo relays them), outside the
            # plan's fingerprint: a cosmetic key, so cached bases stay valid
            cfg = load_config(config, [f"base={ckpt}", f"data.root={world}", f"tasks=[{task}]", "train.progress=true",
                                       f"seed={seed}", f"out={work / f'run{i}'}", *files, *overrides])
            run_dir = train(cfg, config, processes=PRETRAIN_PROCESSES[size])
            ckpt = run_dir / read_stages(run_dir)["stages"][-1]["path"]
            phases.append({"config": config, "task": task, "train": cfg["train"],
                           **_stage_stats(run_dir / "train_log.jsonl")})
            logs += [json.dumps({"phase": config, **json.loads(line)})
                     for line in (run_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
        summary = {"family": family, "size": size, "plan": plan_fingerprint(family, size), "seed": seed,
                   "world": str(world), "world_version": VERSION,
                   "pretrain_seconds": round(time.perf_counter() - t0, 1), "phases": phases,
                   "steps": sum(p["steps"] for p in phases), "first_loss": phases[-1]["first_loss"],
                   "last_loss": phases[-1]["last_loss"]}
        if quick_check:
            summary["quick_check"] = heldout_report(ckpt, world)
        with atomic_dir(out) as tmp:
            for f in ckpt.iterdir():
                shutil.copy2(f, tmp / f.name)
            (tmp / "pretrain_log.jsonl").write_text("".join(line + "\n" for line in logs))
            (tmp / BASE_JSON).write_text(json.dumps(summary, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def info_key(world: Path, task: str) -> str:
    """The path world.json gives a pretraining file ("pretrain", "pretrain_warmup")."""
    info = load_world(world)
    if task not in info:
        raise ValueError(f"{world}/world.json has no {task!r} entry")
    return info[task]


def _stage_stats(log: Path) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    end = [r for r in rows if r.get("event") == "stage_end"][-1]
    return {"steps": end["steps"], "examples": end["examples"], "train_seconds": end["seconds"],
            "step_seconds": end["step_seconds"], "first_loss": end["first_loss"], "last_loss": end["last_loss"]}


def heldout_report(checkpoint: str | os.PathLike, world: str | os.PathLike, limit: int | None = None) -> dict:
    """QUICK CHECK (see quickcheck.py): greedy exact-match accuracy per task vs chance."""
    from tqdm.auto import tqdm

    from .quickcheck import task_accuracy

    model, processor = load_model(checkpoint), load_processor(checkpoint)
    info = load_world(world)
    rep = {}
    for name in tqdm(HELDOUT_TASKS + TARGET_TASKS + TRANSFER_TASKS, desc="quick check", leave=False):
        rep[name] = {"accuracy": round(task_accuracy(model, processor, world, name, limit=limit), 2),
                     "chance": info["tasks"][name]["chance"], "kind": info["tasks"][name]["kind"]}
    for kind in ("heldout", "target", "transfer"):
        rows = [r for r in rep.values() if r.get("kind") == kind]
        rep[f"mean_{kind}"] = {"accuracy": round(sum(r["accuracy"] for r in rows) / len(rows), 2),
                               "chance": round(sum(r["chance"] for r in rows) / len(rows), 2)}
    return rep


RANGE_FILE = Path(__file__).with_name("base_range.yaml")   # measured by scripts/base_seeds.py (docs/world.md)


def documented_range(family: str, size: str) -> dict[str, list[float]]:
    """{task: [low, high]} of the quick check (accuracy, 0-100) that docs/world.md documents for this base
    model ({} where none is documented)."""
    ranges = yaml.safe_load(RANGE_FILE.read_text()) or {}
    return ranges.get(f"{family}-{size}", {})


def out_of_range(quick_check: dict, family: str, size: str) -> list[str]:
    """The quick-check scores outside their documented range, as 'colour 28.5 (documented 60-95)'."""
    bad = []
    for task, (low, high) in documented_range(family, size).items():
        acc = quick_check.get(task, {}).get("accuracy")
        if acc is None or not low <= acc <= high:
            bad.append(f"{task} {acc} (documented {low:g}-{high:g})")
    return bad


def base_checkpoint(family: str = "qwen2_5_vl", size: str = "toy", *, train: Train) -> Path:
    """The pretrained base model of the embedded world, built on first use through `train`
    (training.run.run) and cached (never committed); rebuilt when its pretraining plan (configs, model
    size, world version) changed since it was built."""
    model_size(size)
    get_family(family)  # both names checked before minutes of building
    path, plan = base_dir(family, size), plan_fingerprint(family, size)
    if is_built(path, plan):
        return path
    why = "its pretraining plan changed" if is_built(path) else "once"
    print(f"[training.world] building the {family} {size} base model into {path} ({why})", file=sys.stderr)
    try:
        return pretrain(family, size, path, train)
    except OSError:
        if is_built(path, plan):  # another process renamed its copy into place first
            return path
        raise
