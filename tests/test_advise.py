"""training.advise: candidates parsed, ranked on the frontier, and the whole advice on a tiny base."""
import json

import numpy as np
import pandas as pd
import pytest

from probes.schemas import ADVICE
from training import advise
from training.config import ConfigError
from training.families import FAMILIES

from .llava_fixture import write_llava_root


def test_candidates_parse_recipe_and_overrides():
    assert advise.parse_candidate("sa_proj") == ("sa_proj", [])
    assert advise.parse_candidate("sa_proj:train.lr=1e-5:mix.share=0.25") == ("sa_proj", ["train.lr=1e-5",
                                                                                           "mix.share=0.25"])
    assert advise.parse_candidate("full:data.root=world:tiny") == ("full", ["data.root=world:tiny"])
    with pytest.raises(ConfigError):
        advise.parse_candidate(":train.lr=1")


def test_rank_puts_the_least_forgetting_learner_first():
    t = pd.DataFrame({"candidate": ["a", "b", "c", "d"], "learning_proxy": [1.0, 0.8, 0.1, 0.6],
                      "predicted_heldout_change": [-5.0, -1.0, 3.0, -2.0], "ci_low": [-9, -5, -1, -6],
                      "ci_high": [-1, 3, 7, 2], "steps": 2})
    r = advise.rank(t, 0.5)
    assert list(r["candidate"]) == ["b", "d", "a", "c"]       # c forgets least but barely learns
    assert dict(zip(r["candidate"], r["pareto"])) == {"a": True, "b": True, "c": True, "d": False}
    assert advise.recommendation(r, 0.5).startswith("recommend b:")


def test_advise_on_a_tiny_base_writes_the_table(tmp_path, capsys):
    base = FAMILIES["qwen2_5_vl"].save_tiny(tmp_path / "base", seed=0)
    root = write_llava_root(tmp_path / "data", n=16, world=True)
    out = tmp_path / "advice"
    rc = advise.main(["--config", "toy-tiny", "--candidates", "sa_proj,mlp_gate_up:train.lr=1e-4", "--steps", "2",
                      "--slice", "4", "--target-items", "4", "--max-new-tokens", "4", "--out", str(out), f"base={base}", f"data.root={root}",
                      "tasks=[pixmocount,pathvqa]", "train.batch_size=4", "train.progress=false",
                      "monitor.captions=4", "monitor.batch_size=4"])
    assert rc == 0
    t = pd.read_parquet(out / "advice.parquet")
    assert tuple(t.columns) == ADVICE.columns and len(t) == 2
    assert set(t["candidate"]) == {"sa_proj", "mlp_gate_up:train.lr=1e-4"} and (t["steps"] == 2).all()
    assert (t["task"] == "pixmocount").all() and sorted(t["rank"]) == [1, 2]
    num = t[["learning_proxy", "kl_to_base", "predicted_heldout_change", "ci_low", "ci_high", "seconds"]]
    assert np.isfinite(num.to_numpy(float)).all()
    assert (t["ci_low"] < t["predicted_heldout_change"]).all() and (t["predicted_heldout_change"] < t["ci_high"]).all()
    assert (t["kl_to_base"] > 0).all() and (out / "frontier.png").is_file()
    assert (t["target_items"] > 0).all() and np.isfinite(t["target_gain"]).all()   # pixmocount's target benchmark
    trial = json.loads((out / "trials" / "sa_proj" / "run.json").read_text())
    assert trial["tasks"] == ["pixmocount"] and trial["config"]["monitor"]["every"] == 2
    printed = capsys.readouterr().out
    assert "recommend " in printed and "default.json" in printed


def test_an_unknown_stage_is_refused(tmp_path, capsys):
    rc = advise.main(["--config", "toy-tiny", "--candidates", "sa_proj", "--steps", "1", "--stage", "nope",
                      "--out", str(tmp_path)])
    assert rc == 2 and "--stage 'nope'" in capsys.readouterr().err
