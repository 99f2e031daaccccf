"""train.log_with: a missing package is named before the run starts; the curves' step axis and keys; with
tensorboard installed, a tiny run writes event files."""
import json

import pytest

from training import run as run_mod
from training import trackers
from training.families import FAMILIES

from .llava_fixture import write_llava_root


class FakeAccelerator:
    def __init__(self):
        self.logged, self.config, self.ended = [], None, False

    def init_trackers(self, name, config=None):
        self.name, self.config = name, config

    def log(self, values, step=None):
        self.logged.append((step, values))

    def end_training(self):
        self.ended = True


def test_a_missing_tracker_package_is_named(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(trackers, "find_spec", lambda name: None)
    rc = run_mod.main(["--config", "toy-tiny", "train.log_with=wandb", "--out", str(tmp_path / "run")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "'wandb' package" in err and "pip install wandb" in err
    assert not (tmp_path / "run").exists()          # refused before anything is written


def test_curves_log_train_and_monitor_values_on_a_run_wide_step_axis(tmp_path):
    acc = FakeAccelerator()
    c = trackers.Curves(acc, tmp_path / "myrun", {"train": {"lr": 1e-3, "adam_betas": [0.9, 0.99]}, "tasks": ["a"]})
    assert acc.name == "myrun" and acc.config == {"train.lr": 1e-3, "train.adam_betas": "[0.9, 0.99]",
                                                   "tasks": '["a"]'}
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"stage": 1, "event": "stage_end", "steps": 5}) + "\n")
    c.stage(2, trackers.steps_before(log, 2))
    c.train({"stage": 2, "step": 3, "loss": 0.5, "lr": 1e-4, "vision_lr": None})
    c.train({"stage": 2, "event": "stage_end", "steps": 4})            # not a step record: nothing sent
    c.monitor(2, 4, {"kl_to_base": {"mean": 0.1, "std": 0.0}})
    c.close()
    assert acc.logged == [(8, {"train/loss": 0.5, "train/stage": 2, "train/lr": 1e-4}),
                          (9, {"monitor/kl_to_base": 0.1})]
    assert acc.ended and trackers.steps_before(tmp_path / "none.jsonl", 3) == 0


def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard")
    base = FAMILIES["qwen2_5_vl"].save_tiny(tmp_path / "base", seed=0)
    root = write_llava_root(tmp_path / "data", n=8, world=True)
    rc = run_mod.main(["--config", "toy-tiny", f"base={base}", f"data.root={root}", "tasks=[pixmocount]",
                       "train.max_steps=2", "train.batch_size=4", "train.progress=false", "monitor.every=1",
                       "monitor.captions=4", "monitor.batch_size=4", "train.log_with=tensorboard",
                       "--out", str(tmp_path / "run")])
    assert rc == 0
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "monitor/kl_to_base", "monitor/number_mass"} <= tags
