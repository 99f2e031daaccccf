"""analysis of the drift tables: signature moves, SA vs MLP per layer, the monitor's prediction of held-out
forgetting and its cost; planted tables with known answers, then the whole chain on a real tiny run."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import drift_monitor, drift_report, layers, signatures
from analysis.tables import load_run
from probes.schemas import LAYERS

from .synthetic import write_run


def _probe_rows(run_dir: Path, recipe: str, names: list[str], series: dict[str, list[float]]) -> None:
    rows = []
    for probe, vals in series.items():
        for s, v in enumerate(vals):
            rows.append({"run": run_dir.name, "stage": s, "stage_name": names[s], "task": None if s == 0 else names[s],
                         "recipe": recipe, "checkpoint": f"stage-{s:02d}", "probe": probe, "mode": "teacher-forced",
                         "mean": v, "std": 0.0, "ci_low": v, "ci_high": v, "n_samples": 8, "n_positions": 80,
                         "dataset": "c", "dataset_hash": "h"})
    pd.DataFrame(rows).to_parquet(run_dir / "probes.parquet")


def _planted_run(root: Path, name: str, recipe: str, heldout: list[float], monitor: dict[str, list[list[float]]]):
    """A run with tasks count, colour; held-out mean = heldout[s]; monitor[probe][stage] = values at steps
    0, 2, 4 (stage 0: one value)."""
    tasks = ["count", "colour"]
    A = pd.DataFrame({"count": [10, 60, 55], "colour": [20, 20, 70], "h": heldout}, dtype=float)
    d = write_run(root / name, recipe, tasks, A, {"count": "target", "colour": "target", "h": "heldout"})
    rows = []
    for probe, per_stage in monitor.items():
        for s, vals in enumerate(per_stage):
            for j, v in enumerate(vals):
                rows.append({"run": name, "stage": s, "stage_name": (["base"] + tasks)[s], "task": None,
                             "step": 2 * j, "probe": probe, "value": v, "std": 0.0, "n_samples": 4, "n_positions": 40,
                             "seconds": 0.01, "lr_scale": 1.0, "event": "", "dataset": "c", "dataset_hash": "h"})
    pd.DataFrame(rows).to_parquet(d / "monitor.parquet")
    return d


def test_signature_moves_planted(tmp_path):
    d = _planted_run(tmp_path, "r", "full", [50, 40, 45], {"number_mass": [[0.1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]})
    _probe_rows(d, "full", ["base", "count", "colour"],
                {"sig_count_mass": [0.01, 0.02, 0.01], "sig_colour_mass": [0.04, 0.04, 0.12],
                 "number_mass": [0.1, 0.3, 0.1]})
    mv = signatures.signature_moves(load_run(d))
    got = mv.set_index(["stage", "signature_task"])
    assert got.loc[(1, "count"), "log2_step"] == pytest.approx(1.0) and got.loc[(1, "count"), "own"]
    assert got.loc[(1, "colour"), "log2_step"] == pytest.approx(0.0) and not got.loc[(1, "colour"), "own"]
    assert got.loc[(2, "count"), "log2_step"] == pytest.approx(-1.0)
    assert got.loc[(2, "colour"), "log2_step"] == pytest.approx(math.log2(3)) and got.loc[(2, "colour"), "rank"] == 1
    assert got.loc[(2, "colour"), "shift"] == pytest.approx(0.08)
    assert set(mv["signature"]) == {"sig_count_mass", "sig_colour_mass"}          # number_mass is not a signature
    s = signatures.summary(mv).set_index("stage")
    assert s.loc[1, "most_moved"] == "count" and s.loc[1, "own_rank"] == 1
    assert s.loc[2, "most_moved"] == "colour" and s.loc[2, "own_log2_step"] == pytest.approx(math.log2(3))
    signatures.figure(mv)


def test_monitor_prediction_and_steps(tmp_path):
    rng = np.random.default_rng(0)
    dirs = []
    for i in range(4):
        ends = rng.uniform(0, 0.2, size=2)
        # held-out change planted as a decreasing function of the end shift: rank correlation exactly -1
        h = [50.0, 50 - 100 * ends[0] ** 2, 50 - 100 * ends[1] ** 2]
        mon = {"number_mass": [[0.1], [0.1, 0.1 + ends[0] / 2, 0.1 + ends[0]], [0.1 + ends[0], 0.1, 0.1 + ends[1]]]}
        dirs.append(_planted_run(tmp_path, f"r{i}", "full" if i % 2 else "sa_proj", h, mon))
    runs = drift_report.load(dirs)
    pts = drift_monitor.prediction_points(runs)
    assert len(pts) == 8 and (pts["last_step"] == 4).all() and (pts["early_step"] == 2).all()
    r0 = pts[(pts.run == "r0") & (pts.stage == 2)].iloc[0]
    assert r0["early_shift"] == pytest.approx(0.0) and r0["heldout_change"] == pytest.approx(runs[0].evals.query(
        "stage == 2")["score"].iloc[-1] - 50)
    tab = drift_monitor.prediction_table(pts, n_boot=200, n_perm=200).set_index(["x", "method"])
    assert tab.loc[("end_shift", "spearman"), "estimate"] == pytest.approx(-1.0)
    assert tab.loc[("end_shift", "kendall"), "estimate"] == pytest.approx(-1.0)
    assert tab.loc[("end_shift", "spearman"), "p_value"] < 0.05
    mon = drift_monitor.global_steps(drift_monitor.load_monitor(runs[0]))
    assert sorted(set(mon["x"])) == [0, 2, 4, 6, 8]           # stage 2's steps follow stage 1's last
    drift_monitor.figure(runs, "number_mass")


def test_sa_vs_mlp_by_hand():
    rows = []
    for run, recipe in (("a", "sa_proj"), ("b", "sa_proj"), ("c", "mlp")):
        for stage in (0, 1, 2):
            for layer in (0, 1):
                for comp in ("attn", "mlp"):
                    v = 0.0 if stage == 0 else (stage + layer) * (2.0 if comp == "mlp" else 1.0) * (3 if run == "b" else 1)
                    rows.append({c: None for c in LAYERS.columns} | {
                        "run": run, "recipe": recipe, "stage": stage, "layer": layer, "component": comp,
                        "measure": "logit_l2", "mean": v})
    t = layers.sa_vs_mlp(pd.DataFrame(rows)).set_index(["recipe", "layer"])
    # sa_proj layer 1: attn = mean over runs a (stages 1, 2: 2, 3) and b (6, 9) = mean(2.5, 7.5) = 5; mlp twice
    assert t.loc[("sa_proj", 1), "attn"] == pytest.approx(5.0) and t.loc[("sa_proj", 1), "mlp"] == pytest.approx(10.0)
    assert t.loc[("sa_proj", 1), "mlp_share"] == pytest.approx(2 / 3) and t.loc[("mlp", 0), "n_points"] == 4
    layers.figure(pd.DataFrame(rows))


def test_readers_and_writers_share_one_schema_per_table():
    """Each table's columns are defined once (probes.schemas): writers and analysis use those objects, one
    TableError, and no other module spells a table's columns out again."""
    import ast

    from analysis import tables
    from probes import layers as layer_writer
    from probes import lmms_eval_import, schemas, table
    from training import run as run_mod

    assert tables.EVALS is table.EVALS is schemas.EVALS and tables.PROBES is table.PROBES is schemas.PROBES
    assert layers.LAYERS is schemas.LAYERS and layer_writer.COLUMNS is schemas.LAYERS.columns
    assert drift_monitor.MONITOR is run_mod.MONITOR is schemas.MONITOR
    for module in (tables, layers, drift_monitor, lmms_eval_import, table):
        assert module.TableError is schemas.TableError
    assert issubclass(table.TableBusy, schemas.TableError)
    every = [set(s.columns) for s in (schemas.PROBES, schemas.EVALS, schemas.ITEMS, schemas.LAYERS, schemas.MONITOR)]
    root = Path(schemas.__file__).parents[1]
    for path in [p for pkg in ("training", "probes", "analysis") for p in (root / pkg).rglob("*.py")]:
        if path.name == "schemas.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) >= 6 and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
                names = {e.value for e in node.elts}   # a selection of some columns is fine; all of them is not
                assert names not in every, f"{path}:{node.lineno} repeats a table's columns"


def test_the_whole_chain_on_a_tiny_run(tmp_path, tiny_checkpoints, capsys):
    """train (monitor on) -> probes.run --drift --signatures -> probes.layers -> probes.evaluate ->
    probes.monitor_cost -> analysis.drift_report, on the LLaVA fixture."""
    from probes.evaluate import main as evaluate
    from probes.layers import main as layers_main
    from probes.monitor_cost import main as cost_main
    from probes.run import main as probes_run
    from training import run as run_mod
    from training.config import load_config

    from .llava_fixture import write_llava_root

    root = write_llava_root(tmp_path / "data", n=8, world=True)
    cfg = load_config("toy-tiny", [f"base={tiny_checkpoints('qwen2_5_vl')}", f"data.root={root}",
                                   "train.progress=false", "tasks=[pixmocount,pathvqa]", "train.max_steps=4",
                                   "train.batch_size=4", "train.lr=0.01", "monitor.every=2", "monitor.captions=4"])
    cfg["recipe"], cfg["out"] = "full", str(tmp_path / "run")
    run = run_mod.run(cfg, "toy-tiny")
    assert probes_run(["--ckpt-dir", str(run), "--drift", "--signatures", "--batch-size", "4"]) == 0
    assert layers_main(["--ckpt-dir", str(run), "--num-samples", "4"]) == 0
    assert evaluate(["--ckpt-dir", str(run), "--limit", "4"]) == 0
    assert cost_main(["--ckpt-dir", str(run), "--repeats", "1", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "ratio: one held-out evaluation =" in out
    cost = json.loads((run / "monitor_cost.json").read_text())
    # held-out for this run: the world's held-out set and the targets it does not train (as probes.evaluate splits)
    assert cost["monitor"]["captions"] == 4
    assert set(cost["heldout"]["benchmarks"]) == {"colour", "cub200", "textvqa", "timeclock"}
    assert cost["ratio_heldout_to_check"] == pytest.approx(cost["heldout"]["seconds"] / cost["monitor"]["seconds_per_check"])
    assert drift_report.main(["--run-dir", str(run), "--n-boot", "50", "--n-perm", "50"]) == 0
    report = capsys.readouterr().out
    for part in ("which stage moves which signature", "self-attention vs MLP", "in-training probe vs held-out",
                 "monitor cost"):
        assert part in report
    a = run / "analysis"
    for f in ("signature_moves.csv", "layers_sa_vs_mlp.csv", "monitor_prediction.csv", "monitor_cost.csv",
              "figures/signature_moves.png", "figures/layers_sa_vs_mlp_logit_l2.png", "figures/monitor_number_mass.png",
              "figures/monitor_kl_to_base.png"):
        assert (a / f).is_file(), f
