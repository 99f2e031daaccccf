"""The drift monitor of `training.run`: probe the model being trained every `monitor.every` optimizer steps.

    python -m training.run --config toy --recipe full monitor.every=20
    python -m training.run --config toy --recipe full monitor.every=20 monitor.budget=0.02 monitor.on_budget=lower_lr

At the start of every stage (step 0, the model the stage starts from), every `monitor.every` steps, and at
the stage's last step, the model is probed (`probe(model) -> (values, seconds)`: probes.monitor measures, on
the first `monitor.captions` captions of the run's caption set, number_mass, entropy, the task signatures'
masses and, with `monitor.kl`, kl_to_base and top1_agreement against stage 0; training.run assembles it).
This module is the controller: when to check, the table, the drift budget. Stage 0's own values are
recorded once as stage 0, step 0.

RUN/monitor.parquet, one row per (stage, step, probe): run, stage, stage_name, task, step, probe, value (mean
over the captions), std, n_samples, n_positions, seconds (wall time of that check), lr_scale (product of the
LR reductions so far in the stage), event ("" | "budget_stop" | "budget_lower_lr"), dataset, dataset_hash.

Drift budget (off unless `monitor.budget` is set): when |P - P_ref| > budget for P = `monitor.probe`
(default number_mass) and P_ref its value at the base (`monitor.reference: base`) or at the stage's start
(`stage_start`), `monitor.on_budget: stop` ends the stage there (its checkpoint is the model at that step),
`lower_lr` multiplies the stage's learning rates (every group, and the schedule's base values) by
`monitor.lr_factor` and goes on (checked again at the next check).

Built by training.run before stage 0 is written (what can be checked is checked then); the probe's
reference (and stage 0's values) is made at the first check. Checks run inside training.loop.train_stage
(its StageHooks: start after accelerator.prepare, after every optimizer step, end), so a stage's `seconds`
include them.

The monitor never changes the training: the probe runs in eval mode under inference_mode with a forked
RNG (the model's train mode is restored), so a run with the monitor and no budget gives bitwise the
weights of a run without it, and a resumed run repeats the same checks and decisions. One process or DDP;
it needs the whole model on each process, so FSDP / ZeRO-3 runs are refused.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import pandas as pd

from .config import ConfigError
from .loop import StageHooks


class MonitorError(ConfigError):
    """A monitor that cannot run with this config or run; the message names the key."""


class Probe(Protocol):
    """What the monitor measures with (probes.monitor.MonitorProbe, assembled by training.run)."""
    probe_names: list[str]           # the probes its values have
    dataset: str | None              # the caption set's name and the subset's hash (after `reference`)
    dataset_hash: str | None

    def reference(self) -> tuple[dict, float]:
        """Called once, when stage 0 exists: stage 0's values ({probe: {mean, std, n_samples, n_positions}}), seconds."""

    def __call__(self, model) -> tuple[dict, float]:
        """The model's values and the seconds the check took."""


class DriftMonitor(StageHooks):
    """Built by `create`; its probe's reference (and stage 0's values) is made at the first check, when stage 0
    exists."""

    def __init__(self, cfg: dict, out: Path, stages: list[dict], probe: Probe, table, *, main: bool = True,
                 on_values: Callable[[int, int, dict], None] | None = None):
        self.cfg, self.out, self.main, self.run_name = cfg["monitor"], Path(out), main, Path(out).name
        self.table = table                      # the table's schema (probes.schemas.MONITOR)
        self.on_values = on_values              # (stage, step, values) of every check: training.trackers' curves
        self.path = self.out / table.file
        self.stages, self.probe = stages, probe
        self.base_values = None
        self.stage = None

    def _setup(self) -> None:
        self.base_values, seconds = self.probe.reference()
        if self.cfg["probe"] not in self.probe.probe_names:
            raise MonitorError(f"monitor.probe {self.cfg['probe']!r} is not among the monitor's probes "
                               f"({', '.join(self.probe.probe_names)})")
        self.dataset, self.dataset_hash = self.probe.dataset, self.probe.dataset_hash
        self.rows = self._kept_rows()
        self._add(0, "base", None, 0, self.base_values, seconds, 1.0, "")

    # -- the table -----------------------------------------------------------------------------------
    def _kept_rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            return pd.read_parquet(self.path).to_dict("records")
        except Exception as e:  # noqa: BLE001 (a truncated file: start the table again, the run is the truth)
            print(f"[training.run] {self.path}: unreadable ({e}); starting a new monitor table")
            return []

    def _add(self, stage: int, stage_name: str, task, step: int, values: dict, seconds: float, lr_scale: float,
             event: str) -> None:
        self.rows = [r for r in self.rows if not (r["stage"] == stage and r["step"] == step)]
        for probe, v in values.items():
            self.rows.append({"run": self.run_name, "stage": stage, "stage_name": stage_name, "task": task,
                              "step": step, "probe": probe, "value": v["mean"], "std": v["std"],
                              "n_samples": v["n_samples"], "n_positions": v["n_positions"], "seconds": seconds,
                              "lr_scale": lr_scale, "event": event, "dataset": self.dataset,
                              "dataset_hash": self.dataset_hash})
        self._write()

    def _write(self) -> None:
        if not self.main:
            return
        df = pd.DataFrame(self.rows, columns=list(self.table.columns)).sort_values(list(self.table.order),
                                                                                    kind="stable")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.out)
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- the stage -----------------------------------------------------------------------------------
    def on_stage_start(self, index: int, model) -> None:
        """Check the model stage `index` starts from (step 0); rows an interrupted run left for this stage or
        later ones are dropped first."""
        if self.base_values is None:
            self._setup()
        stage = self.stages[index]
        self.stage, self.lr_scale, self.stopped, self.last_step = stage, 1.0, False, None
        self.checks, self.seconds = 0, 0.0
        self.rows = [r for r in self.rows if r["stage"] < stage["index"]]
        self.start_values = self._check(0, model, "")

    def _check(self, step: int, model, event: str) -> dict:
        values, seconds = self.probe(model)
        self.checks += 1
        self.seconds += seconds
        self.last_step = step
        self._add(self.stage["index"], self.stage["name"], self.stage["task"], step, values, seconds, self.lr_scale,
                  event)
        if self.on_values is not None:
            self.on_values(self.stage["index"], step, values)
        return values

    def on_step(self, step: int, model, optimizer, scheduler) -> bool:
        """Called after every optimizer step; True when the stage must stop (drift budget exceeded)."""
        if step % int(self.cfg["every"]):
            return False
        values = self._check(step, model, "")
        budget = self.cfg["budget"]
        if budget is None:
            return False
        ref = self.base_values if self.cfg["reference"] == "base" else self.start_values
        probe = self.cfg["probe"]
        exceeded = abs(values[probe]["mean"] - ref[probe]["mean"]) > float(budget)
        exceeded = _agree(exceeded)
        if not exceeded:
            return False
        if self.cfg["on_budget"] == "stop":
            self.stopped = True
            self._mark(step, "budget_stop")
            return True
        f = float(self.cfg["lr_factor"])
        scheduler.base_lrs = [lr * f for lr in scheduler.base_lrs]    # the schedule's later steps
        for g in optimizer.param_groups:                            # and the current step's
            g["lr"] *= f
        self.lr_scale *= f
        self._mark(step, "budget_lower_lr")
        return False

    def _mark(self, step: int, event: str) -> None:
        for r in self.rows:
            if r["stage"] == self.stage["index"] and r["step"] == step:
                r["event"], r["lr_scale"] = event, self.lr_scale
        self._write()

    def on_stage_end(self, steps: int, model) -> dict:
        """Check the stage's last step (unless just checked); returns the stage's train_log.jsonl record."""
        if self.last_step != steps:
            self._check(steps, model, "")
        return {"event": "monitor", "monitor_checks": self.checks, "monitor_seconds_per_check": round(self.seconds / max(self.checks, 1), 5),
                "monitor_stopped_at": steps if self.stopped else None, "monitor_lr_scale": self.lr_scale}


def _agree(flag: bool) -> bool:
    """Every process takes the main process's decision (DDP replicas compute the same values anyway)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def create(cfg: dict, plan, out: Path, accelerator, make_probe: Callable[[dict], Probe], table,
           on_values: Callable[[int, int, dict], None] | None = None) -> DriftMonitor | None:
    """The run's monitor, or None when `monitor.every` is 0. Checks what it can before stage 0 is written;
    `make_probe(captions)` gives the probe of the run's caption set ({"path", "images"}); `table` is the monitor
    table's schema (probes.schemas.MONITOR); `on_values` sees every check's values."""
    m = cfg["monitor"]
    if not m["every"]:
        return None
    from .records import caption_set

    kind = accelerator.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED"):
        raise MonitorError(f"monitor.every is set but the run is sharded ({kind}); the monitor needs the whole model "
                           "on each process: use DDP, or monitor.every=0")
    captions = caption_set(plan.root, cfg["probe"])
    if not captions:
        raise MonitorError("monitor.every is set but the run has no caption set (set probe.captions, or use a world "
                           "data.root)")
    probe = make_probe(captions)
    if m["probe"] not in probe.probe_names:
        raise MonitorError(f"monitor.probe {m['probe']!r} is not among the monitor's probes "
                           f"({', '.join(sorted(probe.probe_names))})")
    return DriftMonitor(cfg, out, plan.stages, probe, table, main=accelerator.is_main_process, on_values=on_values)
