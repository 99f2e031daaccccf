"""probes.sweep, the one driver of probes.run / evaluate / layers, with a command that needs no model:
resume, per-checkpoint failures and the exit status, the run lock, bad input, and when `start` runs."""
import json
from dataclasses import dataclass

import pandas as pd
import pytest

from probes import table
from probes.sweep import Command, SweepOptions, sweep
from training.families import CheckpointError


@dataclass(frozen=True, kw_only=True)
class CountOptions(SweepOptions):
    broken: tuple[int, ...] = ()        # stages whose `open` fails
    crash: tuple[int, ...] = ()         # stages whose `compute` raises an unexpected error


class Count(Command):
    """Writes one probes.parquet row per checkpoint: value = the stage number."""
    prog, table_file = "probes.count", "probes.parquet"

    def setup(self, run, out, procs):
        super().setup(run, out, procs)
        self.started, self.opened = [], []

    def plan(self, checkpoints, out):
        df = table.read_table(out)
        return [([] if table.done(df, ck.stage, ck.rel, "teacher-forced", ["count"], "h") else ["count"], None)
                for ck in checkpoints]

    def start(self, units):
        self.started.append(list(units))

    def open(self, ck):
        self.opened.append(ck.stage)
        if ck.stage in self.opts.broken:
            raise CheckpointError(f"{ck.path}: broken")
        return ck.stage

    def compute(self, opened, ck, unit):
        if ck.stage in self.opts.crash:
            raise KeyError("unexpected")
        return {0: float(opened)}

    def rows(self, ck, unit, shares):
        v = shares[0][0]
        return [{"run": self.run.name, "stage": ck.stage, "stage_name": ck.stage_name, "task": ck.task,
                 "recipe": self.run.recipe, "checkpoint": ck.rel, "probe": unit, "mode": "teacher-forced",
                 **table.summarize([v]), "n_positions": 1, "dataset": "d", "dataset_hash": "h"}]

    def summary(self, status):
        print(json.dumps(status))


@pytest.fixture
def run(tmp_path):
    stages = [{"index": i, "name": f"s{i}", "task": None, "path": f"stage-{i:02d}"} for i in range(3)]
    (tmp_path / "run.json").write_text(json.dumps({"recipe": "r", "stages": stages}))
    return tmp_path


def test_a_failed_checkpoint_is_reported_the_others_written_and_a_rerun_continues(run, capsys):
    cmd = Count(CountOptions(ckpt_dir=str(run), broken=(1,), crash=(2,)))
    assert sweep(cmd) == 1
    out, err = capsys.readouterr()
    status = json.loads(out.strip().splitlines()[-1])
    assert status["0"] == "done" and status["1"] == f"FAILED: CheckpointError: {run / 'stage-01'}: broken"
    assert status["2"].startswith("FAILED: KeyError: 'unexpected'\nTraceback")     # an unexpected error: its trace
    assert f"probes.count: stage 1 ({run / 'stage-01'}) FAILED" in err and "2 checkpoint(s) failed" in err
    assert pd.read_parquet(run / "probes.parquet")["mean"].tolist() == [0.0]
    assert cmd.started == [["count"] * 3]

    again = Count(CountOptions(ckpt_dir=str(run)))
    assert sweep(again) == 0
    assert again.opened == [1, 2] and again.started == [["count"] * 2]      # stage 0 is in the table
    assert pd.read_parquet(run / "probes.parquet")["mean"].tolist() == [0.0, 1.0, 2.0]
    done = Count(CountOptions(ckpt_dir=str(run)))
    assert sweep(done) == 0 and done.opened == [] and done.started == [[]]
    assert "skipped (already in the table)" in capsys.readouterr().out


def test_bad_input_and_a_held_table_stop_before_any_checkpoint(run, tmp_path, capsys):
    cmd = Count(CountOptions(ckpt_dir=str(tmp_path / "nope")))
    assert sweep(cmd) == 2 and "probes.count: error:" in capsys.readouterr().err
    with table.RunLock(run / "probes.parquet", "another command"):
        cmd = Count(CountOptions(ckpt_dir=str(run)))
        assert sweep(cmd) == 2 and cmd.opened == []
        assert "is being written by another command" in capsys.readouterr().err
    assert sweep(Count(CountOptions(ckpt_dir=str(run)))) == 0    # the lock goes with the command that held it
