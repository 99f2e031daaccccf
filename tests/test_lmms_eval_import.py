"""lmms-eval results.json per stage -> evals.parquet, then analysed like any run."""
import json

import pandas as pd
import pytest

from analysis import analyze
from probes.lmms_eval_import import ResultsError, import_results
from probes.lmms_eval_import import main as import_main

from .synthetic import write_run


def _results(chartqa, docvqa, count, mmstar_subtask=0.5):
    """A results file shaped like lmms-eval's (values are fractions; stderr and alias entries beside)."""
    return {
        "results": {
            "chartqa": {"alias": "chartqa", "relaxed_overall,none": chartqa, "relaxed_overall_stderr,none": 0.01,
                        "relaxed_human_split,none": 0.1},
            "docvqa_val": {"alias": "docvqa_val", "anls,none": docvqa, "anls_stderr,none": "N/A"},
            "count_test": {"alias": "count_test", "exact_match,none": count, "exact_match_stderr,none": 0.02},
            "mmbench_group": {"alias": "mmbench_group", "acc,none": 0.9},
            "mmbench_sub": {"alias": " - mmbench_sub", "acc,none": mmstar_subtask},
        },
        "group_subtasks": {"mmbench_group": ["mmbench_sub"], "chartqa": []},
        "n-samples": {"chartqa": {"original": 2500, "effective": 500}, "docvqa_val": {"original": 5349, "effective": 200}},
        "config": {"model": "llava_onevision"},
    }


@pytest.fixture
def run(tmp_path):
    A = pd.DataFrame({"count": [0.0, 1.0, 2.0], "h": [1.0, 2.0, 3.0]})
    r = write_run(tmp_path / "ov-full", "full", ["count", "colour"], A, {"count": "target", "h": "heldout"})
    (r / "evals.parquet").unlink()
    return r


def test_import_per_stage(run, tmp_path):
    paths = {}
    for stage, vals in {"0": (0.60, 0.80, 0.10), "count": (0.40, 0.75, 0.70), "stage-02-colour": (0.58, 0.79, 0.65)}.items():
        p = tmp_path / f"res-{stage}.json"
        p.write_text(json.dumps(_results(*vals)))
        paths[stage] = p
    table = import_results(run, paths)
    A = table.pivot(index="stage", columns="benchmark", values="score")
    # fractions x 100; the group entry whose subtask is present is skipped
    assert sorted(A.columns) == ["chartqa", "count_test", "docvqa_val", "mmbench_sub"]
    assert A.loc[1, "chartqa"] == pytest.approx(40.0) and A.loc[2, "count_test"] == pytest.approx(65.0)
    split = table.drop_duplicates("benchmark").set_index("benchmark")["split"]
    assert split["count_test"] == "target" and split["chartqa"] == "heldout"  # "count_test" names task "count"
    row = table[(table.stage == 1) & (table.benchmark == "chartqa")].iloc[0]
    assert (row.metric, row.n, row.stage_name, row.task, row.checkpoint) == ("relaxed_overall", 500, "count", "count",
                                                                            "stage-01-count")
    assert pd.isna(table[table.benchmark == "count_test"]["n"]).all()
    assert list(table.columns) == ["run", "stage", "stage_name", "task", "recipe", "checkpoint", "benchmark", "split",
                                   "metric", "score", "n"]


def test_folder_convention_merge_and_analysis(run):
    for i, vals in enumerate([(0.60, 0.80, 0.10), (0.40, 0.75, 0.70), (0.58, 0.79, 0.65)]):
        stage_dir = run / "lmms_eval" / ["base", "stage-01-count", "2"][i] / "model_name"
        stage_dir.mkdir(parents=True)
        (stage_dir / "20250101_000000_results.json").write_text(json.dumps(_results(*vals)))
    keep = pd.DataFrame([{"run": "ov-full", "stage": 0, "stage_name": "base", "task": None, "recipe": "full",
                          "checkpoint": "stage-00-base", "benchmark": "own_bench", "split": "heldout",
                          "metric": "accuracy", "score": 50.0, "n": 10}])
    keep.to_parquet(run / "evals.parquet")
    assert import_main(["--run-dir", str(run), "--only", "chartqa", "docvqa_val", "count_test"]) == 0
    ev = pd.read_parquet(run / "evals.parquet")
    assert len(ev) == 1 + 3 * 3 and "own_bench" in set(ev.benchmark)  # the row already there is kept
    assert import_main(["--run-dir", str(run), "--only", "chartqa", "docvqa_val", "count_test",
                        "--task-map", "count_test=count"]) == 0
    ev = pd.read_parquet(run / "evals.parquet")
    assert "count" in set(ev.benchmark)
    ev[ev.benchmark != "count_test"].to_parquet(run / "evals.parquet")
    with pytest.warns(UserWarning, match=r"\['own_bench'\] lack scores at some stages"):
        an = analyze([run], probes=False)
    # held-out: chartqa, docvqa_val (own_bench only at stage 0 -> dropped); H = 70, 57.5, 68.5
    assert list(an.metrics["ov-full"].H.round(6)) == [70.0, 57.5, 68.5]
    # target count trained at stage 1: learning 70 - 10 = 60
    assert an.summary.loc[0, "target_learning_mean"] == pytest.approx(60.0)


def test_bad_results_are_named(run, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": {"mme": {"mme_perception_score,none": 1500.0}}}))
    with pytest.raises(ResultsError, match=r"bad.json: task 'mme'.*--scale mme=FACTOR"):
        import_results(run, {"0": bad})
    table = import_results(run, {"0": bad}, scale={"mme": 100 / 2000})
    assert table.score.iloc[0] == pytest.approx(75.0)
    with pytest.raises(ResultsError, match="stage 'nine' is not in run.json"):
        import_results(run, {"nine": bad})
    bad.write_text(json.dumps({"results": {"chartqa": {"relaxed_human_split,none": 0.3}}}))
    with pytest.raises(ResultsError, match="chartqa.*no metric 'relaxed_overall,none'"):
        import_results(run, {"0": bad})
    bad.write_text(json.dumps({"scores": {}}))
    with pytest.raises(ResultsError, match="no \"results\" object"):
        import_results(run, {"0": bad})
    assert import_main(["--run-dir", str(run), "--results", f"0={tmp_path / 'missing'}"]) == 2


def _sample(doc_id, answer, **metrics):
    """One --log_samples line shaped like lmms-eval's (resps dropped where they equal filtered_resps)."""
    return {"doc_id": doc_id, "target": "B", "filtered_resps": [answer], "doc_hash": "h", "prompt_hash": "p",
            "target_hash": "t", **metrics}


def _write_samples(folder, task, samples):
    with open(folder / f"20250101_000000_samples_{task}.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)


def test_per_sample_logs_become_items(run):
    for i, (chart, mm) in enumerate([((1.0, 0.0, 1.0), (1, 1)), ((0.0, 0.0, 1.0), (1, 0)), ((1.0, 1.0, 1.0), (0, 0))]):
        folder = run / "lmms_eval" / str(i) / "model"
        folder.mkdir(parents=True)
        res = _results(sum(chart) / 3, 0.8, 0.5)
        res["results"]["mmstar"] = {"alias": "mmstar", "average,none": sum(mm) / 2}
        (folder / "20250101_000000_results.json").write_text(json.dumps(res))
        _write_samples(folder, "chartqa", [_sample(d, f"a{d}", relaxed_overall=v, relaxed_human_split=0.0)
                                           for d, v in enumerate(chart)])
        _write_samples(folder, "mmstar", [_sample(d, "A", average={"question_id": d, "l2_category": "x", "score": v},
                                                  x={"question_id": d, "l2_category": "x", "score": v})
                                          for d, v in enumerate(mm)])
    assert import_main(["--run-dir", str(run), "--only", "chartqa", "mmstar", "docvqa_val"]) == 0
    items = pd.read_parquet(run / "items.parquet")
    assert list(items.columns) == ["run", "stage", "benchmark", "item_id", "prediction", "score", "metric"]
    assert set(items.benchmark) == {"chartqa", "mmstar"}               # docvqa_val has no samples file: no items
    chart = items[items.benchmark == "chartqa"]
    assert chart[chart.stage == 1].score.tolist() == [0.0, 0.0, 1.0]
    assert chart[chart.stage == 0].prediction.tolist() == ["a0", "a1", "a2"]
    assert set(chart.metric) == {"relaxed_overall"} and set(chart.item_id) == {"0", "1", "2"}
    mm = items[items.benchmark == "mmstar"].set_index(["stage", "item_id"]).score
    assert mm[(0, "0")] == 1.0 and mm[(1, "1")] == 0.0
    # each evals row is the mean of its items
    ev = pd.read_parquet(run / "evals.parquet").set_index(["stage", "benchmark"]).score
    means = items.groupby(["stage", "benchmark"]).score.mean() * 100
    assert means.round(6).to_dict() == ev.loc[means.index].round(6).to_dict()

    from analysis import paired
    pairs = paired.compare_stages(items)
    assert {"chartqa", "mmstar"} <= set(pairs.benchmark)


def test_sample_values_and_bad_logs_are_named(tmp_path):
    from probes.lmms_eval_import import read_samples, sample_value
    assert sample_value({"seed_image": {"pred": "B", "answer": "B", "question_id": 3}}, "seed_image", "x") == 1.0
    assert sample_value({"seed_image": {"pred": "C", "answer": "B"}}, "seed_image", "x") == 0.0
    assert sample_value({"anls": float("nan")}, "anls", "x") is None
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"doc_id": 0, "filtered_resps": [["yes"]], "resps": [["Yes."]], "exact_match": True,
                             "filter": "flexible-extract"}) + "\n"
                 + json.dumps({"doc_id": 0, "filtered_resps": ["Yes."], "exact_match": 0.0, "filter": "none"}) + "\n")
    assert read_samples(p, "exact_match,flexible-extract") == [("0", "yes", 1.0)]
    with pytest.raises(ResultsError, match="doc_id 0 is logged twice"):
        read_samples(p, "exact_match")
    p.write_text('{"doc_id": 0, "exact_match": "high"}\n')
    with pytest.raises(ResultsError, match=r"s.jsonl sample 1: metric 'exact_match' is 'high'"):
        read_samples(p, "exact_match,none")
    p.write_text('{"doc_id": 0, "exact_match": 1}\n{truncated\n')
    with pytest.raises(ResultsError, match="sample 2: malformed JSON"):
        read_samples(p, "exact_match,none")
