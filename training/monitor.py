"""The drift monitor of `training.run`: probe the model being trained every `monitor.every` optimizer steps.

    python -m training.run --config toy --recipe full monitor.every=20
    python -m training.run --config toy --recipe full monitor.every=20 monitor.budget=0.02 monitor.on_budget=lower_lr

At the start of every stage (step 0, the model the stage starts from), every `monitor.every` steps, and at
the stage's last step, the model is probed teacher-forced on the first `monitor.captions` captions of the
run's caption set (the one run.json names): `number_mass` (the counting-bias probe), `entropy`, the task
signatures' `sig_<task>_mass` (`monitor.signatures`, derived as `probes.run --signatures` derives them, from
each run task's training answers against the first 1000 captions) and, with `monitor.kl`, `kl_to_base` and
`top1_agreement` against stage 0 (whose hidden states at the caption positions are computed once; only its
output projection stays in memory). Stage 0's own values are recorded once as stage 0, step 0.

RUN/monitor.parquet, one row per (stage, step, probe): run, stage, stage_name, task, step, probe, value (mean
over the captions), std, n_samples, n_positions, seconds (wall time of that check), lr_scale (product of the
LR reductions so far in the stage), event ("" | "budget_stop" | "budget_lower_lr"), dataset, dataset_hash.

Drift budget (off unless `monitor.budget` is set): when |P - P_ref| > budget for P = `monitor.probe`
(default number_mass) and P_ref its value at the base (`monitor.reference: base`) or at the stage's start
(`stage_start`), `monitor.on_budget: stop` ends the stage there (its checkpoint is the model at that step),
`lower_lr` multiplies the stage's learning rates (every group, and the schedule's base values) by
`monitor.lr_factor` and goes on (checked again at the next check).

Built by training.run before stage 0 is written (what can be checked is checked then); the probe and stage
0's values are made at the first check. Checks run inside training.loop.train_stage (its StageHooks: start after
accelerator.prepare, after every optimizer step, end), so a stage's `seconds` include them.

The monitor never changes the training: its forward runs in eval mode under inference_mode with a forked
RNG (the model's train mode is restored), so a run with the monitor and no budget gives bitwise the
weights of a run without it, and a resumed run repeats the same checks and decisions. One process or DDP;
it needs the whole model on each process, so FSDP / ZeRO-3 runs are refused.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .chat import tokenizer_of
from .checkpoints import LoadOptions, load_model
from .config import ConfigError
from .loop import StageHooks

MONITOR_FILE = "monitor.parquet"
COLUMNS = ["run", "stage", "stage_name", "task", "step", "probe", "value", "std", "n_samples", "n_positions",
           "seconds", "lr_scale", "event", "dataset", "dataset_hash"]
SIGNATURE_CAPTIONS = 1000        # captions the signatures are derived against (probes.run's default set)


class MonitorError(ConfigError):
    """A monitor that cannot run with this config or run; the message names the key."""


def build_probe(m: dict, captions: dict | None, processor, stage0: Path, task_files: dict, opts: LoadOptions):
    """The monitor's probe (probes.drift.CaptionProbe) from the `monitor.*` keys `m`, and stage 0's values:
    (probe, base values, seconds of that check, dataset name, dataset hash). Also used by
    probes.monitor_cost to time the same check."""
    from probes.captions import load_captions, subset_hash
    from probes.drift import CaptionProbe
    from probes.signatures import derive, read_answers
    from probes.tokensets import decoded_vocab, token_set

    if not captions:
        raise MonitorError("monitor.every is set but the run has no caption set (set probe.captions, or use a "
                           "world data.root)")
    every_caption = load_captions(captions["path"], captions.get("images"), num_samples=None, sample="first")
    samples = every_caption.samples[:min(int(m["captions"]), len(every_caption.samples))]
    tok = tokenizer_of(processor)
    vocab = decoded_vocab(tok)
    set_ids = {"number": token_set(tok, "number", vocab)}
    if m["signatures"]:
        refs = [s.caption for s in every_caption.samples[:SIGNATURE_CAPTIONS]]
        for name, path in task_files.items():
            sig = derive(name, read_answers(path), refs, processor, source=str(path), vocab=vocab)
            if sig.tokens:
                set_ids[sig.name] = sig.ids
    base = load_model(stage0, opts)
    probe = CaptionProbe(processor, samples, set_ids, batch_size=int(m["batch_size"]),
                         base_model=base if m["kl"] else None)
    if m["probe"] not in probe.probe_names:
        raise MonitorError(f"monitor.probe {m['probe']!r} is not among the monitor's probes "
                           f"({', '.join(probe.probe_names)})")
    values, seconds = probe(base)
    del base
    _free_memory()
    return probe, values, seconds, every_caption.name, subset_hash(samples)


class DriftMonitor(StageHooks):
    """Built by `create`; its probe (and stage 0's values) are made at the first check, when stage 0 exists."""

    def __init__(self, cfg: dict, out: Path, captions: dict | None, processor, stages: list[dict], tasks: list,
                 opts: LoadOptions, *, main: bool = True):
        self.cfg, self.out, self.main, self.run_name = cfg["monitor"], Path(out), main, Path(out).name
        self.path = self.out / MONITOR_FILE
        self.captions, self.processor, self.stages, self.tasks = captions, processor, stages, tasks
        self.opts = opts
        self.probe = None
        self.stage = None

    def _setup(self) -> None:
        self.probe, self.base_values, seconds, self.dataset, self.dataset_hash = build_probe(
            self.cfg, self.captions, self.processor, self.out / self.stages[0]["path"],
            {t.name: t.train for t in self.tasks}, self.opts)
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
        df = pd.DataFrame(self.rows, columns=COLUMNS).sort_values(["stage", "step", "probe"], kind="stable")
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
        if self.probe is None:
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


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _agree(flag: bool) -> bool:
    """Every process takes the main process's decision (DDP replicas compute the same values anyway)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def create(cfg: dict, plan, out: Path, processor, accelerator, opts: LoadOptions) -> DriftMonitor | None:
    """The run's monitor, or None when `monitor.every` is 0. Checks what it can before stage 0 is written."""
    m = cfg["monitor"]
    if not m["every"]:
        return None
    from .data import caption_set

    kind = accelerator.distributed_type.value
    if kind in ("FSDP", "DEEPSPEED"):
        raise MonitorError(f"monitor.every is set but the run is sharded ({kind}); the monitor needs the whole model "
                           "on each process: use DDP, or monitor.every=0")
    captions = caption_set(plan.root, cfg["probe"])
    if not captions:
        raise MonitorError("monitor.every is set but the run has no caption set (set probe.captions, or use a world "
                           "data.root)")
    known = {"number_mass", "number_max_prob", "entropy"} | ({"kl_to_base", "top1_agreement"} if m["kl"] else set())
    if m["signatures"]:
        from probes.signatures import set_name

        known |= {f"{set_name(t.name)}_{k}" for t in plan.tasks for k in ("mass", "max_prob")}
    if m["probe"] not in known:
        raise MonitorError(f"monitor.probe {m['probe']!r} is not among the monitor's probes ({', '.join(sorted(known))})")
    return DriftMonitor(cfg, out, captions, processor, plan.stages, plan.tasks, replace(opts, device=accelerator.device),
                        main=accelerator.is_main_process)
