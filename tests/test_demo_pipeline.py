"""`make demo` in miniature: scripts/demo.py on the shipped toy-tiny config, i.e. the embedded world's tiny
base model (pretrained through training.run), five stages per recipe, then probes.run, probes.evaluate,
probes.layers, probes.monitor_cost, analysis.run and analysis.drift_report, each as the subprocess the demo
runs. Checks the contracts between the steps, not the numbers (the tiny model learns little)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from training.checkpoints import load_model
from training.recipes import plan

from .test_loop import _changed, _file_keys

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["sa_proj", "mlp_gate_up"]
TARGETS = ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMM_DRIFT_CACHE", str(tmp_path_factory.mktemp("cache")))  # the subprocesses inherit it
        sys.path.insert(0, str(ROOT / "scripts"))
        try:
            import demo
        finally:
            sys.path.remove(str(ROOT / "scripts"))
        rc = demo.main(["--config", "toy-tiny", "--out", str(out), "--runs", ",".join(RUNS), "--workers", "2",
                        "--captions", "16", "--max-new-tokens", "8", "--eval-limit", "12", "--layer-captions", "8",
                        "--monitor-every", "2"])
        assert rc == 0
        yield out


def test_every_step_wrote_its_table(demo_out):
    for name in RUNS:
        run = demo_out / name
        manifest = json.loads((run / "run.json").read_text())
        assert manifest["recipe"] == name and manifest["tasks"] == TARGETS
        stages = list(range(len(TARGETS) + 1))
        probes = pd.read_parquet(run / "probes.parquet")
        assert sorted(probes.stage.unique()) == stages
        assert {"number_mass", "number_max_prob", "entropy", "kl_to_base", "top1_agreement",
                "sig_pixmocount_mass"} <= set(probes.probe)
        assert set(probes["mode"]) == {"teacher-forced", "generate"}
        kl = probes[(probes.probe == "kl_to_base") & (probes["mode"] == "teacher-forced")].set_index("stage")["mean"]
        assert kl.loc[0] == 0 and (kl.loc[1:] > 0).all()  # every stage changed the LM
        study = pd.read_parquet(run / "probes_study.parquet")     # probes.run --profile study
        assert len(study) == 7 * len(stages) and set(study["mode"]) == {"generate"}
        assert {"avg_total_number_prob", "max_number_logit", "num_generation_steps"} <= set(study.probe)
        evals = pd.read_parquet(run / "evals.parquet")
        assert sorted(evals.stage.unique()) == stages
        # the transfer benchmarks (a target's question on other pictures) count as that target's
        assert set(evals[evals.split == "target"].benchmark) == set(TARGETS) | {"pixmocount_tissue", "textvqa_shapes"}
        assert evals[evals.split == "heldout"].benchmark.nunique() == 8
        assert evals.n.eq(12).all() and evals.score.between(0, 100).all()
        assert sorted(pd.read_parquet(run / "layers.parquet").stage.unique()) == stages
        assert set(pd.read_parquet(run / "monitor.parquet").stage) == set(stages)  # stage 0: the reference
        assert (run / "monitor_cost.json").is_file()
    cells = pd.read_csv(demo_out / "analysis" / "cells.csv")  # the world fills all four 2x2 cells
    assert set(cells.cell) == {"image-ID/text-ID", "image-ID/text-OOD", "image-OOD/text-ID", "image-OOD/text-OOD"}
    assert set(cells[cells.cell == "image-OOD/text-ID"].stage_name) == {"pixmocount", "textvqa"}
    table = pd.read_csv(demo_out / "analysis" / "demo_table.csv")
    assert list(table.run) == RUNS and table["number_mass x base @count"].gt(0).all()
    # docs/demo.md's table is this table: the same columns in the same order, one row per run it names
    doc = [line for line in (ROOT / "docs" / "demo.md").read_text().splitlines() if line.startswith("| run | learning")]
    assert len(doc) == 1 and [c.strip() for c in doc[0].strip("|").split("|")] == list(table.columns)
    assert table["study x base @count"].gt(0).all()
    for f in ["heldout_over_sequence", "probe_over_sequence", "learning_vs_forgetting", "signature_moves",
              "layers_sa_vs_mlp_number_logmass", "monitor_number_mass"]:
        assert (demo_out / "analysis" / "figures" / f"{f}.png").stat().st_size > 10_000, f


@pytest.mark.parametrize("name", RUNS)
def test_between_world_stages_exactly_the_recipe_changes(demo_out, name):
    """The shipped config on the world's base model: each stage changes exactly the recipe's tensors."""
    run = demo_out / name
    stages = [run / s["path"] for s in json.loads((run / "run.json").read_text())["stages"]]
    model = load_model(stages[0])
    keys = _file_keys(model)
    expected = {keys[n] for n in plan(model, name).trainable}
    assert expected and all(".mlp.down_proj" not in k and "visual" not in k for k in expected)
    for a, b in zip(stages, stages[1:]):
        assert _changed(a, b) == expected, (a.name, b.name)
