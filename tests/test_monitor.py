"""The drift monitor of training.run: it never changes the weights (a control that consumes the RNG does),
its table agrees with probes.run on the saved checkpoints, the drift budget stops a stage or lowers its LR,
and a resumed run repeats the same checks."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from probes.schemas import MONITOR
from training import monitor as monitor_mod
from training import run as run_mod
from training.config import load_config
from training.families import FAMILIES

from .llava_fixture import write_llava_root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base whose attention dropout makes training consume the RNG, and a fixture data root."""
    tmp = tmp_path_factory.mktemp("monitor")
    base = FAMILIES["qwen2_5_vl"].save_tiny(tmp / "base", seed=0)
    cfg = json.loads((base / "config.json").read_text())
    cfg["text_config"]["attention_dropout"] = 0.1
    (base / "config.json").write_text(json.dumps(cfg))
    return base, write_llava_root(tmp / "data", n=16, world=True)


def _run(tmp: Path, setup, *extra, name="run"):
    base, root = setup
    cfg = load_config("toy-tiny", [f"base={base}", f"data.root={root}", "train.progress=false",
                                   "tasks=[pixmocount,pathvqa]", "train.max_steps=5", "train.batch_size=4",
                                   "monitor.captions=6", "monitor.batch_size=4", *extra])
    cfg["out"] = str(tmp / name)
    return run_mod.run(cfg, "toy-tiny")


def _weights(run: Path) -> dict:
    man = json.loads((run / "run.json").read_text())
    return {s["path"]: load_file(str(run / s["path"] / "model.safetensors")) for s in man["stages"]}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[s].keys() == b[s].keys() and all(torch.equal(a[s][k], b[s][k]) for k in a[s])
                                        for s in a)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, setup):
    tmp = tmp_path_factory.mktemp("runs")
    return {"off": _run(tmp, setup, name="off"), "on": _run(tmp, setup, "monitor.every=2", name="on")}


def test_monitor_leaves_training_bitwise_unchanged(runs, setup, tmp_path, monkeypatch):
    off, on = _weights(runs["off"]), _weights(runs["on"])
    assert _same(off, on)
    # the control: a check that draws one random number changes the weights, so the test above can fail
    original = monitor_mod.DriftMonitor._check
    monkeypatch.setattr(monitor_mod.DriftMonitor, "_check",
                        lambda self, *a, **k: (torch.rand(()), original(self, *a, **k))[1])
    assert not _same(off, _weights(_run(tmp_path, setup, "monitor.every=2", name="leaky")))


def test_monitor_table(runs):
    run = runs["on"]
    df = pd.read_parquet(run / MONITOR.file)
    assert list(df.columns) == list(MONITOR.columns)
    assert not df.duplicated(["stage", "step", "probe"]).any()
    steps = df.groupby("stage")["step"].apply(lambda s: sorted(set(s))).to_dict()
    assert steps == {0: [0], 1: [0, 2, 4, 5], 2: [0, 2, 4, 5]}
    assert {"number_mass", "entropy", "kl_to_base", "top1_agreement", "sig_pixmocount_mass",
            "sig_pathvqa_mass"} <= set(df["probe"])
    v = df.set_index(["stage", "step", "probe"])["value"]
    assert v[(1, 0, "kl_to_base")] == 0.0 and v[(1, 0, "top1_agreement")] == 1.0
    assert v[(1, 5, "kl_to_base")] > 0
    for p in set(df["probe"]):      # stage k's last check and stage k+1's first see the same weights
        assert v[(0, 0, p)] == v[(1, 0, p)] and v[(1, 5, p)] == v[(2, 0, p)], p
    assert (df["n_samples"] == 6).all() and (df["seconds"] > 0).all() and (df["event"] == "").all()
    ends = [r for r in _log(run) if r.get("event") == "monitor"]
    assert [r["monitor_checks"] for r in ends] == [4, 4] and ends[0]["monitor_stopped_at"] is None


def test_monitor_values_equal_probes_run_on_the_saved_checkpoint(runs, tmp_path):
    from probes.run import main as probes_run

    run = runs["on"]
    out = tmp_path / "p.parquet"
    assert probes_run(["--ckpt-dir", str(run), "--num-samples", "6", "--batch-size", "4", "--drift",
                       "--signatures", "--out", str(out)]) == 0
    p = pd.read_parquet(out).query("stage == 2").set_index("probe")["mean"]
    m = pd.read_parquet(run / MONITOR.file).query("stage == 2 and step == 5").set_index("probe")["value"]
    assert set(m.index) <= set(p.index)
    for probe in m.index:
        assert m[probe] == pytest.approx(p[probe], abs=1e-9), probe


def test_budget_stops_the_stage(tmp_path, setup):
    run = _run(tmp_path, setup, "monitor.every=2", "monitor.budget=1e-12", "monitor.reference=stage_start")
    ends = {r["stage"]: r for r in _log(run) if r.get("event") == "stage_end"}
    assert ends[1]["steps"] == 2 and ends[2]["steps"] == 2
    mon = {r["stage"]: r for r in _log(run) if r.get("event") == "monitor"}
    assert mon[1]["monitor_stopped_at"] == 2 and mon[1]["monitor_checks"] == 2
    df = pd.read_parquet(run / MONITOR.file)
    assert set(df.loc[df.event == "budget_stop", "step"]) == {2} and df["step"].max() == 2
    assert len(json.loads((run / "run.json").read_text())["stages"]) == 3      # every stage saved


def test_budget_lowers_the_lr(tmp_path, setup):
    run = _run(tmp_path, setup, "monitor.every=2", "monitor.budget=1e-12", "monitor.on_budget=lower_lr",
               "monitor.lr_factor=0.5", "train.scheduler=constant", "train.warmup_ratio=0", "train.lr=0.001")
    lrs = [r["lr"] for r in _log(run) if r.get("stage") == 1 and "lr" in r]
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4])      # lowered after the checks at steps 2 and 4
    df = pd.read_parquet(run / MONITOR.file).query("stage == 1")
    assert set(df.loc[df.event == "budget_lower_lr", "step"]) == {2, 4}
    assert df.set_index("step")["lr_scale"].groupby(level=0).first().to_dict() == {0: 1.0, 2: 0.5, 4: 0.25, 5: 0.25}


def test_resumed_run_repeats_the_same_checks_and_weights(tmp_path, setup):
    extra = ("monitor.every=2", "monitor.budget=0.001", "monitor.on_budget=lower_lr")
    full = _run(tmp_path, setup, *extra, name="full")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    man = json.loads((part / "run.json").read_text())      # as if killed while stage 2 was training
    man["stages"] = man["stages"][:2]
    (part / "run.json").write_text(json.dumps(man))
    shutil.rmtree(part / "stage-02-pathvqa")
    _run(tmp_path, setup, *extra, name="part")
    assert _same(_weights(full), _weights(part))
    cols = [c for c in MONITOR.columns if c not in ("run", "seconds")]
    a = pd.read_parquet(full / MONITOR.file)[cols]
    b = pd.read_parquet(part / MONITOR.file)[cols]
    assert (a["event"] == "budget_lower_lr").any()          # decisions were taken, and taken alike
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def test_monitor_errors_name_the_key(tmp_path, setup, capsys):
    base, root = setup
    args = ["--config", "toy-tiny", f"base={base}", f"data.root={root}", "tasks=[pixmocount]", "train.max_steps=1",
            "monitor.every=1", "train.progress=false"]
    assert run_mod.main([*args, "monitor.probe=nope", "--out", str(tmp_path / "a")]) == 2
    assert "monitor.probe 'nope'" in capsys.readouterr().err
    # a data root without a caption set
    bare = tmp_path / "bare"
    shutil.copytree(root, bare)
    (bare / "world.json").unlink()
    assert run_mod.main(["--config", "toy-tiny", f"base={base}", f"data.root={bare}", "tasks=[pixmocount]",
                         "train.max_steps=1", "monitor.every=1", "--out", str(tmp_path / "b")]) == 2
    assert "no caption set" in capsys.readouterr().err


def test_monitor_settings_defaults_are_the_configs():
    from probes.monitor import MonitorSettings
    from training.config import defaults

    assert MonitorSettings() == MonitorSettings.of(defaults()["monitor"])


class _ScriptedProbe:
    """A probe that returns given number_mass values: the controller needs nothing of probes."""
    probe_names, dataset, dataset_hash = ["number_mass"], "caps", "h"

    def __init__(self, base, values):
        self.base, self.values = base, iter(values)

    @staticmethod
    def _values(v):
        return {"number_mass": {"mean": v, "std": 0.0, "n_samples": 1, "n_positions": 3}}

    def reference(self):
        return self._values(self.base), 0.5

    def __call__(self, model):
        return self._values(next(self.values)), 0.25


def test_the_budget_controller_takes_any_probe(tmp_path):
    m = {"every": 2, "probe": "number_mass", "budget": 0.2, "reference": "base", "on_budget": "stop", "lr_factor": 0.5}
    stages = [{"index": 0, "name": "base", "task": None, "path": "stage-00-base"},
              {"index": 1, "name": "t", "task": "t", "path": "stage-01-t"}]
    mon = monitor_mod.DriftMonitor({"monitor": m}, tmp_path, stages, _ScriptedProbe(0.1, [0.1, 0.2, 0.35]), MONITOR)
    mon.on_stage_start(1, model=None)
    assert not mon.on_step(1, None, None, None) and not mon.on_step(2, None, None, None)
    assert mon.on_step(4, None, None, None)                     # |0.35 - 0.1| > 0.2: stop
    assert mon.on_stage_end(4, None)["monitor_stopped_at"] == 4
    df = pd.read_parquet(tmp_path / MONITOR.file)
    assert df[["stage", "step", "value", "event"]].values.tolist() == [
        [0, 0, 0.1, ""], [1, 0, 0.1, ""], [1, 2, 0.2, ""], [1, 4, 0.35, "budget_stop"]]
    assert set(df["dataset"]) == {"caps"} and list(df.columns) == list(MONITOR.columns)
