"""The sequential loop: teach a base model a list of tasks one after another with one recipe (or a baseline
method paired with a recipe: training/methods, docs/baselines.md).

    python -m training.run --config PATH [--recipe NAME] [--out DIR] [key=value ...]
    accelerate launch --config_file training/configs/accelerate/fsdp.yaml -m training.run --config ...

Writes RUN/run.json and one checkpoint per stage, stage 0 being the base (docs/design.md):

    RUN/run.json            {"family", "recipe", "base", "tasks", "config", "stages": [...],
                             "captions": {"path", "images"} | null, "benchmarks": [names],
                             "domains": {name: {"image", "text"}}, "task_files": {...}, "benchmark_files": {...}}
                            (training/manifest.py: the one writer and reader)
    RUN/stage-00-base/      the base (save: full), or a delta with no tensors naming it (save: delta)
    RUN/stage-01-TASK/ ...  stage k = stage k-1 fine-tuned on tasks[k-1]; each stage starts from the
                            previous stage's saved checkpoint
    RUN/train_log.jsonl     one line per optimizer step (stage, task, step, loss, lr, ...) and per stage end

Resume: rerun the same command. Stages listed in run.json are complete (folders are renamed into place
only when fully written, run.json is rewritten atomically after each stage); the run continues after the
last of them and gives the same weights as an uninterrupted run, because a stage's data order and RNG
depend only on (seed, stage index). A run directory made with a different config is refused.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from probes.schemas import MONITOR

from . import checkpoints
from .chat import tokenizer_of
from .config import SCHEMA, ConfigError, apply, describe, load_config, resolve_path
from .data import Collator, DataError, benchmark_names, load_records, resolve_root, resolve_task
from .domains import run_domains
from .families import CheckpointError
from .loop import StageHooks
from .manifest import ManifestError, data_files, library_versions, path_of
from .manifest import load as load_manifest
from .manifest import write as write_manifest
from .methods import StageContext
from .methods import build as build_method
from .methods import label as recipe_label
from .mixing import PREVIOUS, pool_names, stage_dataset
from .recipes import RecipeError, model_skeleton, resolve_spec
from .records import caption_set
from .trackers import Curves, steps_before

TRAIN_LOG = "train_log.jsonl"
# Keys that do not change the weights a run produces: a resumed run may change them.
COSMETIC = ("out", "train.progress", "train.log_every", "train.log_with", "data.num_workers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RunError(ValueError):
    """A run that cannot start or continue; the message names the input."""


def resolve_base(base: str | None) -> Path:
    """A checkpoint folder, or `world:FAMILY:SIZE` (the embedded world's base model, built on first use)."""
    if not base:
        raise RunError("no base model: set base (a checkpoint folder, or world:FAMILY:SIZE)")
    if base.startswith("world:"):
        parts = base.split(":")
        if len(parts) != 3:
            raise RunError(f"base {base!r}: expected world:FAMILY:SIZE, e.g. world:qwen2_5_vl:toy")
        from .world.base import base_checkpoint  # lazy: the world is heavy and optional
        return Path(base_checkpoint(parts[1], parts[2], train=run_in_processes))   # pretrained by this loop
    path = Path(base)
    if not checkpoints.is_checkpoint(path):
        raise RunError(f"base {base!r} is not a checkpoint folder (no config.json with *.safetensors, nor a delta)")
    return path.resolve()


def stage_dirname(index: int, name: str) -> str:
    return f"stage-{index:02d}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"


def _new_default(key: str, old: dict, new: dict) -> bool:
    """A key added to the schema after the old run was written, at its default: the same setup (so runs of
    an earlier version of the toolkit resume)."""
    return key not in old and key in SCHEMA and new.get(key) == SCHEMA[key].default


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "tasks":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_dir(cfg: dict, config_name: str) -> Path:
    """The run directory: `out`, else runs/CONFIG-RECIPE."""
    return Path(cfg["out"] or Path("runs") / f"{config_name}-{re.sub(r'[^A-Za-z0-9_.+-]+', '_', recipe_label(cfg))}")


class Plan:
    """Everything a run needs, resolved and checked before any training starts."""

    def __init__(self, cfg: dict, config_name: str):
        self.cfg = cfg
        if not cfg["tasks"]:
            raise RunError("no tasks: set tasks (a list of task names)")
        self.method = build_method(cfg)  # the method and its parameter recipe (training.methods)
        self.label = recipe_label(cfg)   # what run.json's "recipe" records
        resolve_spec(self.method.recipe)  # an unknown recipe fails now, not after stage 0
        self.base = resolve_base(cfg["base"])
        self.family = checkpoints.family_of(self.base)
        if cfg["family"] and cfg["family"] != self.family.name:
            raise RunError(f"config family {cfg['family']!r} but base {self.base} is a {self.family.name} checkpoint")
        full = checkpoints.read_delta(self.base)[1] if checkpoints.is_delta(self.base) else self.base
        self.method.check(model_skeleton(full))  # a recipe the method cannot take fails now, before stage 0
        if cfg["save"] == "delta" and checkpoints.is_delta(self.base):
            raise RunError(f"save: delta needs a full base checkpoint; base {self.base} is itself a delta")
        self.root = resolve_root(cfg["data"])
        self.tasks = [resolve_task(t, cfg["data"], self.root) for t in cfg["tasks"]]
        extra = [n for n in cfg["mix"]["sources"] if n != PREVIOUS] if cfg["mix"]["share"] > 0 else []
        self.mix_tasks = {t.name: t for t in self.tasks} | {n: resolve_task(n, cfg["data"], self.root) for n in extra}
        for t in self.mix_tasks.values():  # malformed data fails now, with the file and record named
            load_records(t.train, cfg["data"]["max_examples"])
        self.out = run_dir(cfg, config_name)
        self.stages = [{"index": 0, "name": "base", "task": None, "path": stage_dirname(0, "base")}] + [
            {"index": i, "name": t, "task": t, "path": stage_dirname(i, t)} for i, t in enumerate(cfg["tasks"], 1)]

    def manifest(self, done: int) -> dict:
        """run.json (training.manifest) with the first `done` stages."""
        benchmarks = benchmark_names(self.root, self.cfg["eval"])
        return {"family": self.family.name, "recipe": self.label, "base": str(self.base),
                "tasks": list(self.cfg["tasks"]), "config": self.cfg, "stages": self.stages[:done],
                "captions": caption_set(self.root, self.cfg["probe"]), "benchmarks": benchmarks,
                "domains": run_domains(self.root, self.cfg["eval"], list(dict.fromkeys(self.cfg["tasks"] + benchmarks))),
                **data_files(self.root, self.cfg["data"], list(self.cfg["tasks"])), "libraries": library_versions()}

    def variant_manifest(self, variant: str, done: int) -> dict:
        """run.json of RUN/VARIANT/ (e.g. WiSE-FT's un-merged models): the same stages, stage 0 the run's."""
        man = self.manifest(done)
        man["recipe"] = f"{self.label}-{variant}"
        man["stages"] = [dict(st, path=f"../{st['path']}") if st["index"] == 0 else st for st in man["stages"]]
        return man

    def mix_pool(self, stage: int) -> list:
        """The tasks stage `stage` mixes in (data-hybrid training); empty without mix.share."""
        if self.cfg["mix"]["share"] <= 0:
            return []
        return [self.mix_tasks[n] for n in pool_names(self.cfg["mix"]["sources"], self.cfg["tasks"], stage)]

    def completed(self) -> int:
        """How many stages (from 0) an existing run directory already holds; refuses a different run."""
        path = path_of(self.out)
        if not path.is_file():
            return 0
        try:
            old = load_manifest(path)
        except ManifestError as e:
            raise RunError(f"{e}; remove the run directory or use another --out") from None
        new = self.manifest(0)
        diffs = [k for k in ("family", "recipe", "base", "tasks") if old.get(k) != new[k]]
        a, b = _flat(old.get("config", {})), _flat(self.cfg)
        diffs += [f"config {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                  if k not in COSMETIC and a.get(k) != b.get(k) and not _new_default(k, a, b)]
        if diffs:
            raise RunError(f"{self.out} holds a run with a different setup ({'; '.join(diffs)[:500]}); "
                           "use another --out, or remove that directory to start over")
        done = 0
        for have, want in zip(old.get("stages", []), self.stages):
            if have != want or not checkpoints.is_stage(self.out / want["path"]):
                break
            done += 1
        return done


class TrainLog:
    """RUN/train_log.jsonl; restarting stage k drops whatever an interrupted stage k had written."""

    def __init__(self, path: Path, keep_before: int, enabled: bool, curves: Curves | None = None):
        self.path, self.enabled, self.curves = path, enabled, curves
        if enabled and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("stage", 0) < keep_before]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.curves is not None:
                self.curves.train(record)


def monitor_probe(cfg: dict, plan: Plan, out: Path, captions: dict, processor, opts: checkpoints.LoadOptions):
    """The drift monitor's probe (probes.monitor), of the run's caption set and tasks against stage 0."""
    from probes.monitor import MonitorProbe, MonitorSettings

    return MonitorProbe(MonitorSettings.of(cfg["monitor"]), captions, processor, out / plan.stages[0]["path"],
                        {t.name: t.train for t in plan.tasks}, opts)


def run(cfg: dict, config_name: str = "run", *, allow_pickle: bool = False, trust_remote_code: bool = False,
        hooks: Sequence[StageHooks] = ()) -> Path:
    """Run (or resume) the whole sequence; returns the run directory. The base is read from safetensors, with
    no code of its own, unless `allow_pickle` (torch.load with weights_only) / `trust_remote_code`. `hooks`
    see every stage after the drift monitor (training.advise stops its short trials with one)."""
    from .loop import full_state_dict, make_accelerator, train_stage
    from .monitor import create as create_monitor

    accelerator = make_accelerator(cfg["train"], project_dir=run_dir(cfg, config_name) if cfg["train"]["log_with"]
                                   else None)
    with accelerator.main_process_first():  # rank 0 builds the world / base model if needed, the others reuse it
        plan = Plan(cfg, config_name)
    method = plan.method
    if not method.sharded_ok and accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise RunError(f"method {method.name} is not supported with {accelerator.distributed_type.value} yet "
                       "(it needs the whole model on every process); use DDP (training/configs/accelerate/ddp.yaml)")
    out = plan.out
    main = accelerator.is_main_process
    done = plan.completed()
    accelerator.wait_for_everyone()  # every rank has read the run directory before rank 0 writes stage 0 into it
    if main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".stage-*.tmp-*"):  # left by a process killed while writing a stage
            shutil.rmtree(stale, ignore_errors=True)
    if done:
        print(f"[training.run] {out}: resuming after stage {done - 1} ({plan.stages[done - 1]['path']})",
              file=sys.stderr)
    dtype = DTYPES[cfg["model"]["dtype"]]
    opts = checkpoints.LoadOptions(dtype=dtype, attn=cfg["model"]["attn_implementation"], allow_pickle=allow_pickle,
                                   trust_remote_code=trust_remote_code)
    processor = checkpoints.load_processor(plan.base, opts)
    pad_id = tokenizer_of(processor).pad_token_id
    if pad_id is None:
        raise RunError(f"{plan.base}: the tokenizer has no pad token")
    curves = Curves(accelerator, out, cfg) if cfg["train"]["log_with"] else None   # TensorBoard / W&B
    # monitor.every; its probe is built at the first check; its table's schema comes from probes (the writers' schemas)
    monitor = create_monitor(cfg, plan, out, accelerator, lambda captions: monitor_probe(
        cfg, plan, out, captions, processor, replace(opts, device=accelerator.device)), MONITOR,
        on_values=curves.monitor if curves else None)

    if done == 0:
        stage0 = out / plan.stages[0]["path"]
        if main:
            if cfg["save"] == "delta":
                checkpoints.save_delta(torch.nn.Module(), processor, stage0, plan.base, [], plan.family)
            else:
                checkpoints.save_full(checkpoints.load_model(plan.base, opts), processor, stage0)
            write_manifest(out, plan.manifest(1))
        accelerator.wait_for_everyone()
        done = 1

    train_cfg = method.train_config(cfg["train"])
    for stage in plan.stages[done:]:
        k, task = stage["index"], plan.tasks[stage["index"] - 1]
        log = TrainLog(out / TRAIN_LOG, keep_before=k, enabled=main, curves=curves)
        if curves:
            curves.stage(k, steps_before(out / TRAIN_LOG, k))
        ctx = StageContext(index=k, task=task.name, prev=out / plan.stages[k - 1]["path"], path=out / stage["path"],
                           run_dir=out, stage0=out / plan.stages[0]["path"], base=plan.base, family=plan.family,
                           processor=processor, save=cfg["save"], accelerator=accelerator)
        model = method.load(ctx.prev, opts)
        dataset, mixed = stage_dataset(task, plan.mix_pool(k), processor, share=cfg["mix"]["share"], seed=cfg["seed"],
                                       stage=k, max_examples=cfg["data"]["max_examples"])
        method.begin_stage(model, ctx)
        result = train_stage(model, dataset, Collator(plan.family, pad_id), train_cfg, seed=cfg["seed"], stage=k,
                             method=method, hooks=([monitor] if monitor else []) + list(hooks), accelerator=accelerator,
                             num_workers=cfg["data"]["num_workers"],
                             log=lambda r, k=k, t=task.name, w=log.write: w({"stage": k, "task": t, **r}),
                             desc=f"stage {k}/{len(plan.tasks)} {task.name}")
        state = full_state_dict(accelerator, result.model)
        if main:
            method.finish(accelerator.unwrap_model(result.model), ctx, result.trainable, state)
            losses = result.losses
            log.write({"stage": k, "task": task.name, "event": "stage_end", "steps": result.steps,
                       "examples": result.examples, "seconds": round(result.seconds, 3),
                       "step_seconds": round(result.step_seconds, 5), "first_loss": losses[0],
                       "last_loss": losses[-1], **({"mixed": mixed} if mixed else {})})
            for variant in method.active_variants():  # sibling run directories (RUN/VARIANT/run.json)
                write_manifest(out / variant, plan.variant_manifest(variant, k + 1))
            write_manifest(out, plan.manifest(k + 1))  # last: now the stage counts as done
            print(f"[training.run] stage {k} {task.name}: {result.steps} steps in {result.seconds:.1f}s, "
                  f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; saved {out / stage['path']}", file=sys.stderr)
        accelerator.wait_for_everyone()
        method.end_stage()
        del model, result, state
        accelerator.free_memory()
    if curves:
        curves.close()
    return out


def run_in_processes(cfg: dict, config_name: str, processes: int = 1) -> Path:
    """`run` as `processes` CPU processes of one thread each (DDP through torch.distributed.run), the global
    batch kept (train.batch_size split between them); in this process when `processes` is 1 or there is a
    GPU. On a small model this uses a machine's cores better than one process's threads (the world's base
    build, which passes this function as its `train`: docs/world.md). Returns the run directory."""
    if processes <= 1 or torch.cuda.is_available():
        return run(cfg, config_name)
    batch = int(cfg["train"]["batch_size"])
    if batch % processes:
        raise RunError(f"train.batch_size={batch} does not split between {processes} processes")
    out = run_dir(cfg, config_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = out.parent / f".{out.name}.config" / f"{config_name}.yaml"   # its stem names the config in run.json
    spec.parent.mkdir(exist_ok=True)
    spec.write_text(yaml.safe_dump({**cfg, "out": str(out), "train": {**cfg["train"], "batch_size": batch // processes}}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "training.run", "--config", str(spec)]
    try:
        rc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode   # stdout: each rank's run dir
    finally:
        shutil.rmtree(spec.parent, ignore_errors=True)
    if rc != 0:
        raise RunError(f"{config_name}: training.run over {processes} processes failed (exit {rc}); its output is above")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.run", description=__doc__.split("\n\n")[0],
                                 epilog="config keys (set in the YAML or as key=value):\n" + describe(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a YAML file, or a name in training/configs (toy, toy-tiny)")
    ap.add_argument("--recipe", help="overrides the config's recipe (e.g. sa_proj, mlp_gate_up), or names a "
                    "baseline method: lora, lwf, wise_ft, moe, or METHOD+RECIPE (docs/baselines.md)")
    ap.add_argument("--out", help="run directory (default: the config's out, else runs/CONFIG-RECIPE)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=1e-4 tasks=[cub200]")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="read a base with only pickle weights (*.bin), via torch.load(weights_only=True)")
    ap.add_argument("--trust-remote-code", action="store_true", help="let the base's own Python code run")
    args = ap.parse_intermixed_args(argv)  # key=value may come before or after the flags
    try:
        cfg = load_config(args.config, args.overrides)
        if args.recipe:
            apply(cfg, "recipe", args.recipe, "--recipe")
        if args.out:
            apply(cfg, "out", args.out, "--out")
        out = run(cfg, resolve_path(args.config).stem, allow_pickle=args.allow_pickle,
                  trust_remote_code=args.trust_remote_code)
    except (ConfigError, DataError, RecipeError, CheckpointError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
