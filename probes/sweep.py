"""The one driver of the commands that go over every checkpoint of a run: probes.run, probes.evaluate, probes.layers.

A command is a `Command` (one file per command: its options dataclass, its flags, and these steps):
    setup(run, out, procs)    resolve the inputs, on every rank (bad input raises one of `input_errors`: exit 2)
    plan(checkpoints, out)    rank 0, under the table's run lock: per checkpoint (units still to compute, clash)
    start(units)              what every checkpoint shares (a base reference); only when some unit is to compute
    open(ck)                  load one checkpoint (every rank)
    compute(opened, ck, unit) this rank's share of one unit (a set of modes, a benchmark, a checkpoint's layers)
    rows(ck, unit, shares)    rank 0: the gathered shares as table rows, which `append` writes
    summary(status)           rank 0: the table as it now is
The driver owns the rest, the same for every command: the processes (one, or torchrun's: each rank computes
its share, rank 0 gathers the shares, decides and writes, and every rank takes rank 0's decisions and exits
alike), discovery (probes.discover), the run lock (a second command on the same table is refused), resume
(what the plan says is in the table is skipped), rows appended after every unit, and failures: a checkpoint
that fails on any rank is reported with its first error and the others still run; the exit status is then 1.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from training.checkpoints import LoadOptions
from training.families import CheckpointError

from . import table
from .captions import CaptionDataError
from .cli import load_options
from .discover import Checkpoint, DiscoveryError, RunDir, discover

SKIPPED, DONE, FAILED = "skipped (already in the table)", "done", "FAILED: "


# -- processes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Procs:
    """This process's place among the sweep's processes (torchrun's environment, else one)."""
    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls) -> Procs:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def say(self, *a, **k) -> None:
        if self.main:
            print(*a, **k)

    def share(self, batches: list) -> list:
        """This rank's whole batches of a plan every rank made alike: every world-th one."""
        return batches[self.rank::self.world]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def first_error(self, errors: list | None) -> str | None:
        """Rank 0's choice, on every rank, of the first error of a gathered list (None: no rank failed)."""
        first = None
        if self.main:
            first = next((f"rank {r}: {e}" if self.world > 1 else e for r, e in enumerate(errors) if e), None)
        return self.broadcast(first)


# -- what every command takes --------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """The options every sweep command has (probes.cli.add_loading_arguments and --ckpt-dir, --out, --replace)."""
    ckpt_dir: str
    out: str | None = None
    device: str = "auto"
    attn: str = "auto"
    strict: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    replace: bool = False

    @classmethod
    def from_args(cls, args, **changed):
        """The options of an argparse namespace (its fields by name), with `changed` ones given here."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in changed}, **changed)

    @property
    def load(self) -> LoadOptions:
        return load_options(self)


class Command:
    """What one command supplies to `sweep` (see the module docstring); the defaults do nothing."""
    prog = "probes"                    # the command's name in messages and in the run lock
    table_file = "table.parquet"       # its table's file name in the run directory (--out overrides)
    sharded = True                     # False: one process does all (every torchrun rank would run it whole)
    unit_desc: str | None = None       # progress-bar label of a checkpoint's units, when it has several
    input_errors: tuple[type[Exception], ...] = (DiscoveryError, CaptionDataError, CheckpointError, table.TableError)
    known_errors: tuple[type[Exception], ...] = (CheckpointError, CaptionDataError, ValueError)   # no traceback

    def __init__(self, opts: SweepOptions):
        self.opts = opts

    def setup(self, run: RunDir, out: Path, procs: Procs) -> None:
        self.run, self.out, self.procs = run, out, procs

    def plan(self, checkpoints: list[Checkpoint], out: Path) -> list[tuple[list, str | None]]:
        raise NotImplementedError

    def header(self) -> list[str]:
        return []

    def warnings(self) -> list[str]:
        return []

    def start(self, units: list) -> None:
        pass

    def open(self, ck: Checkpoint):
        raise NotImplementedError

    def compute(self, opened, ck: Checkpoint, unit):
        raise NotImplementedError

    def label(self, unit) -> str | None:
        """How a failure of `unit` is named in the checkpoint's status (None: not named)."""
        return None

    def rows(self, ck: Checkpoint, unit, shares: list) -> list[dict]:
        raise NotImplementedError

    def append(self, out: Path, rows: list[dict]) -> None:
        table.append_rows(out, rows)

    def summary(self, status: dict[int, str]) -> None:
        pass


# -- the sweep -------------------------------------------------------------------------------------
def sweep(cmd: Command) -> int:
    """Run `cmd` over every checkpoint; 0, 1 when a checkpoint failed, 2 on bad input."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()      # one bar per checkpoint and per batch is ours; no weight-loading bars
    procs = Procs.start() if cmd.sharded else Procs()
    with contextlib.ExitStack() as held:   # the run lock on the table, released however the sweep ends
        code = _sweep(cmd, procs, held)
    procs.stop()
    return code


def _sweep(cmd: Command, procs: Procs, held: contextlib.ExitStack) -> int:
    plan = error = None
    try:                      # every rank reads the same inputs and fails alike; only rank 0 reads the table
        run = discover(cmd.opts.ckpt_dir)
        out = Path(cmd.opts.out) if cmd.opts.out else run.root / cmd.table_file
        cmd.setup(run, out, procs)
        if procs.main:
            held.enter_context(table.RunLock(out, cmd.prog))   # a second command on this table is refused
            plan = cmd.plan(run.checkpoints, out)
    except cmd.input_errors as e:
        error = str(e)
    plan, error = procs.broadcast((plan, error) if procs.main else None)
    if error is None:
        for line in cmd.header():
            procs.say(line)
        _warn(cmd, procs)
        error = _agreed(cmd, procs, cmd.start, [u for units, clash in plan if not clash for u in units])[1]
    if error is not None:
        if procs.main:
            print(f"{cmd.prog}: error: {error}", file=sys.stderr)
        return 2
    status: dict[int, str] = {}
    for ck, (units, clash) in tqdm(list(zip(run.checkpoints, plan)), desc="checkpoints", unit="ckpt",
                                   disable=not procs.main):
        status[ck.stage] = FAILED + clash if clash else _checkpoint(cmd, procs, ck, units, out) if units else SKIPPED
    failed = [ck for ck in run.checkpoints if status[ck.stage].startswith(FAILED)]
    if procs.main:
        cmd.summary(status)
        for ck in failed:
            print(f"{cmd.prog}: stage {ck.stage} ({ck.path}) {status[ck.stage]}", file=sys.stderr)
        if failed:
            print(f"{cmd.prog}: {len(failed)} checkpoint(s) failed; the others are in {out}", file=sys.stderr)
        _warn(cmd, procs)
    return 1 if procs.broadcast(len(failed) if procs.main else None) else 0   # every rank exits alike


def _checkpoint(cmd: Command, procs: Procs, ck: Checkpoint, units: list, out: Path) -> str:
    """One checkpoint's units, each computed in shares, gathered and written; its status (rank 0's)."""
    opened, error = _agreed(cmd, procs, cmd.open, ck)   # a rank that cannot load it: every rank skips it
    if error is not None:
        return FAILED + error
    failures = []
    try:
        for unit in tqdm(units, desc=f"stage {ck.stage} {cmd.unit_desc}", unit="unit", leave=False,
                         disable=not procs.main or cmd.unit_desc is None):
            try:
                share = {"values": cmd.compute(opened, ck, unit)}
            except Exception as e:  # noqa: BLE001 (reported with the checkpoint; the others still run)
                share = {"error": _describe(cmd, e)}
            shares = procs.gather(share)
            if procs.main:
                failure = _write(cmd, ck, unit, shares, out)
                if failure is not None:
                    name = cmd.label(unit)
                    failures.append(f"{name}: {failure}" if name else failure)
    finally:
        del opened
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return FAILED + "; ".join(failures) if failures else DONE


def _write(cmd: Command, ck: Checkpoint, unit, shares: list[dict], out: Path) -> str | None:
    """Rank 0: the unit's rows appended to the table; the failure, if any."""
    errors = [f"rank {r}: {s['error']}" if len(shares) > 1 else s["error"] for r, s in enumerate(shares)
              if "error" in s]
    if errors:
        return errors[0]
    try:
        cmd.append(out, cmd.rows(ck, unit, [s["values"] for s in shares]))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def _agreed(cmd: Command, procs: Procs, step, *args):
    """(result, None) when `step(*args)` worked on every rank, else (None or the result, the first error)."""
    result = error = None
    try:
        result = step(*args)
    except Exception as e:  # noqa: BLE001
        error = _describe(cmd, e)
    return result, procs.first_error(procs.gather(error))


def _describe(cmd: Command, e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    if not isinstance(e, cmd.known_errors):
        msg += "\n" + traceback.format_exc(limit=3)
    return msg


def _warn(cmd: Command, procs: Procs) -> None:
    for line in cmd.warnings() if procs.main else []:
        print(f"{cmd.prog}: warning: {line}", file=sys.stderr)
