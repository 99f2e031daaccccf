"""`python -m probes.evaluate`: benchmark resolution, the evals.parquet contract, scoring with planted
answers (exact expected scores), batch invariance of real generation, resuming, failures and bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from analysis.tables import load_run
from probes import benchmarks as B
from probes import table
from probes.decode import Generation
from probes.engine import Engine
from probes.evaluate import main
from probes.schemas import EVALS
from probes.scorers import get_scorer
from tests.llava_fixture import write_llava_root
from training.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
VALIDATE = Path("/work/shared/tools/validate_run.py")



@pytest.fixture(scope="module")
def stage_models(tmp_path_factory):
    """Two tiny random qwen checkpoints (seeds 0, 1), saved once; tests copy them into their own runs."""
    root = tmp_path_factory.mktemp("eval-stages")
    for s in range(2):
        FAMILIES["qwen2_5_vl"].save_tiny(root / f"s{s}", seed=s)
    return root


def make_run(root: Path, stage_models: Path, benchmarks=("cub200", "pixmocount", "colour"), tasks=("cub200",),
             world: bool = True) -> Path:
    """A run directory shaped like training.run's: stage 0 base + one stage per task, config.data.root =
    a synthetic world (tests/llava_fixture.py), run.json "benchmarks"."""
    data = write_llava_root(root / "world", n=4, world=world)
    run = root / "run"
    stages = [{"index": 0, "name": "base", "task": None, "path": "stage-00-base"}]
    stages += [{"index": i, "name": t, "task": t, "path": f"stage-{i:02d}-{t}"} for i, t in enumerate(tasks, 1)]
    for i, s in enumerate(stages):
        shutil.copytree(stage_models / f"s{i % 2}", run / s["path"])
    man = {"family": "qwen2_5_vl", "recipe": "full", "base": "tiny", "tasks": list(tasks),
           "config": {"data": {"root": str(data)}}, "stages": stages, "benchmarks": list(benchmarks)}
    (run / "run.json").write_text(json.dumps(man))
    return run


def refs_by_id(run: Path) -> dict[str, list[str]]:
    """Sample id (as probes.benchmarks names it) -> references, read from every test file of the world."""
    out = {}
    world = json.loads((Path(json.loads((run / "run.json").read_text())["config"]["data"]["root"]) / "world.json")
                       .read_text())
    for name, e in world["tasks"].items():
        bench = B.Benchmark(name, run.parent / "world" / e["test"], run.parent / "world" / "images", e["scorer"])
        for it in B.load(bench).items:
            out[it.sample.id] = it.references
    return out


def plant(monkeypatch, answer):
    """Replace generation by `answer(sample, index) -> text`, honouring the batches the caller plans."""
    calls = []

    def fake(self, samples, batch_size=32, max_new_tokens=16, stats=False, padding_side="left", batches=None,
             progress=False):
        idx = [i for b in (batches if batches is not None else [list(range(len(samples)))]) for i in b]
        calls.append((len(samples), max_new_tokens))
        return [Generation(i, [], answer(samples[i], i), True) for i in sorted(idx)]
    monkeypatch.setattr(Engine, "generate", fake)
    return calls


# -- the contract ----------------------------------------------------------------------------------
def test_world_run_table_contract_predictions_and_resume(tmp_path, stage_models, capsys, monkeypatch):
    run = make_run(tmp_path, stage_models)
    assert main(["--ckpt-dir", str(run), "--max-new-tokens", "4", "--batch-size", "3", "--save-predictions"]) == 0
    out = capsys.readouterr().out
    df = pd.read_parquet(run / "evals.parquet")
    assert list(df.columns) == list(EVALS.columns)
    assert len(df) == 6 and not df.duplicated(["stage", "benchmark"]).any()
    by = df.set_index(["stage", "benchmark"])
    assert by.loc[(1, "cub200"), "split"] == "target"            # the run trains cub200
    assert by.loc[(1, "pixmocount"), "split"] == "heldout"       # a world target this run never trains
    assert by.loc[(0, "colour"), "split"] == "heldout"
    assert set(df["metric"]) == {"exact"} and set(df["n"]) == {8} and set(df["recipe"]) == {"full"}
    assert by.loc[(1, "cub200"), ["stage_name", "task", "checkpoint"]].tolist() == ["cub200", "cub200",
                                                                                   "stage-01-cub200"]
    assert pd.isna(by.loc[(0, "cub200"), "task"]) and set(df["run"]) == {"run"}
    # items.parquet: one row per item, whose mean score is the benchmark's score / 100
    items = pd.read_parquet(run / "items.parquet")
    assert len(items) == 6 * 8 and not items.duplicated(["stage", "benchmark", "item_id"]).any()
    means = items.groupby(["stage", "benchmark"])["score"].mean() * 100
    assert all(means[k] == pytest.approx(by.loc[k, "score"], abs=1e-9) for k in means.index)
    # the score is 100 x the mean of the scorer over the saved predictions
    for (stage, bench), r in by.iterrows():
        folder = "stage-00-base" if stage == 0 else "stage-01-cub200"
        lines = [json.loads(x) for x in (run / "predictions" / folder / f"{bench}.jsonl").read_text().splitlines()]
        assert len(lines) == 8
        per = [get_scorer("exact")(x["prediction"], x["references"]) for x in lines]
        assert [x["score"] for x in lines] == per
        assert r["score"] == pytest.approx(100 * sum(per) / 8, abs=1e-12)
    assert "cub200 [T]" in out and "heldout avg" in out
    # the analysis reads it, the shared validator accepts it
    assert len(load_run(run, probes=False).evals) == 6
    if VALIDATE.is_file():
        v = subprocess.run([sys.executable, str(VALIDATE), str(run)], capture_output=True, text=True)
        assert v.returncode == 0, v.stdout + v.stderr
    # a rerun does nothing; a deleted row is the only one recomputed
    before = (run / "evals.parquet").read_bytes()
    calls = plant(monkeypatch, lambda s, i: "x")
    assert main(["--ckpt-dir", str(run), "--max-new-tokens", "4"]) == 0
    assert calls == [] and (run / "evals.parquet").read_bytes() == before
    assert "skipped (already in the table)" in capsys.readouterr().out
    df[~((df["stage"] == 1) & (df["benchmark"] == "colour"))].to_parquet(run / "evals.parquet")
    assert main(["--ckpt-dir", str(run), "--max-new-tokens", "4"]) == 0
    assert calls == [(8, 4)]
    new = pd.read_parquet(run / "evals.parquet").set_index(["stage", "benchmark"])
    assert len(new) == 6 and new.loc[(1, "colour"), "score"] == 0.0     # "x" is never right
    assert new.drop((1, "colour")).equals(by.drop((1, "colour")))


def test_planted_answers_give_exact_scores(tmp_path, stage_models, monkeypatch, capsys):
    """Generation replaced by a planted predictor: right on every other item -> exactly 50.0; VQA answers
    lists and number words scored by their published definitions (hand-worked values)."""
    run = make_run(tmp_path, stage_models)
    refs = refs_by_id(run)
    # a local VQA-style benchmark: 10 answers per record; the planted answer matches 2 of them ->
    # leave-one-out mean (2 x 1/3 + 8 x 2/3) / 10 = 0.6; a record it matches 3 times: (3 x 2/3 + 7 x 1) / 10 = 0.9
    vqa_dir = tmp_path / "vqa"
    (vqa_dir / "img").mkdir(parents=True)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(vqa_dir / "img" / "a.png")
    recs = [{"id": "q0", "image": "a.png", "answers": ["Two", "2", "two"] + ["three"] * 7,
             "conversations": [{"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]},
            {"id": "q1", "image": "a.png", "answers": ["red", "red."] + ["blue"] * 8,
             "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}]
    (vqa_dir / "test.json").write_text(json.dumps(recs))
    # a registry file: an integer benchmark read from the world's counting test file
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"benchmarks:\n  count_int:\n    test: {run.parent / 'world/tasks/pixmocount/test.json'}\n"
                   f"    images: {run.parent / 'world/images'}\n    scorer: integer\n    max_new_tokens: 3\n")
    words = {"2": "two", "3": "three", "5": "five", "7": "seven"}

    def answer(sample, i):
        bench = sample.id.split("/")[0]
        if bench == "vqa_local":
            return {"How many?": "2", "Colour?": "Red"}[sample.instruction]
        if bench == "count_int":
            return f"There are {words[refs[sample.id.replace('count_int', 'pixmocount')][0]]} squares."
        return refs[sample.id][0] if i % 2 == 0 else "certainly not"
    calls = plant(monkeypatch, answer)
    rc = main(["--ckpt-dir", str(run), "--benchmark-file", f"vqa_local={vqa_dir / 'test.json'}",
               "--images", str(vqa_dir / "img"), "--scorer", "vqa", "--registry", str(reg)])
    assert rc == 0, capsys.readouterr().err
    df = pd.read_parquet(run / "evals.parquet").set_index(["stage", "benchmark"])
    assert len(df) == 2 * 5
    for stage in (0, 1):
        for bench in ("cub200", "pixmocount", "colour"):
            assert df.loc[(stage, bench), "score"] == 50.0 and df.loc[(stage, bench), "n"] == 8
        assert df.loc[(stage, "vqa_local"), "score"] == pytest.approx(75.0, abs=1e-9)   # (0.6 + 0.9) / 2
        assert df.loc[(stage, "vqa_local"), ["metric", "split", "n"]].tolist() == ["vqa", "heldout", 2]
        assert df.loc[(stage, "count_int"), ["score", "metric"]].tolist() == [100.0, "integer"]
        assert df.loc[(stage, "count_int"), "split"] == "heldout"
    # max_new_tokens: the default 16, the registry's own 3
    assert sorted(set(calls)) == [(2, 16), (8, 3), (8, 16)]
    # --limit: the first N records; --max-new-tokens overrides every benchmark's own
    calls.clear()
    assert main(["--ckpt-dir", str(run), "--benchmarks", "cub200,count_int", "--limit", "3", "--out",
                 str(tmp_path / "lim.parquet"), "--registry", str(reg), "--max-new-tokens", "5"]) == 0
    lim = pd.read_parquet(tmp_path / "lim.parquet")
    assert set(lim["n"]) == {3} and set(calls) == {(3, 5)}
    assert set(lim[lim.benchmark == "cub200"]["score"]) == {100 * 2 / 3}


# -- batch invariance of real generation -----------------------------------------------------------
def test_real_generation_is_batch_and_padding_invariant(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models, benchmarks=("cub200", "timeclock_val"))
    # a local benchmark whose images differ in size, so batches pad prompts of different lengths
    d = tmp_path / "sizes"
    (d / "img").mkdir(parents=True)
    recs = []
    for i in range(8):
        Image.new("RGB", (16 + 8 * i, 40 - 3 * i), (30 * i, 100, 200 - 20 * i)).save(d / "img" / f"{i}.png")
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + "What time is it?" + " Look closely." * (i % 3)},
            {"from": "gpt", "value": f"{1 + i}:{5 * i:02d}"}]})
    (d / "test.json").write_text(json.dumps(recs))
    common = ["--ckpt-dir", str(run), "--benchmark-file", f"timeclock_val={d / 'test.json'}", "--images",
              str(d / "img"), "--scorer", "clock", "--max-new-tokens", "8", "--save-predictions"]
    tables, preds = [], []
    for k, (bs, side) in enumerate([(1, "left"), (8, "left"), (8, "right"), (3, "right")]):
        out = tmp_path / f"t{k}.parquet"
        shutil.rmtree(run / "predictions", ignore_errors=True)
        assert main([*common, "--batch-size", str(bs), "--padding-side", side, "--out", str(out)]) == 0
        tables.append(pd.read_parquet(out))
        preds.append({p.relative_to(run).as_posix(): p.read_text() for p in (run / "predictions").rglob("*.jsonl")})
    assert len(preds[0]) == 4                                     # 2 stages x 2 benchmarks
    texts = [json.loads(x)["prediction"] for x in preds[0]["predictions/stage-00-base/cub200.jsonl"].splitlines()]
    assert any(texts), "the tiny model generated nothing: the comparison would be empty"
    for t, p in zip(tables[1:], preds[1:]):
        pd.testing.assert_frame_equal(t, tables[0], check_exact=True)
        assert p == preds[0]
    # timeclock_val names no task of this run (it trains cub200 only)
    assert set(tables[0][tables[0].benchmark == "timeclock_val"]["split"]) == {"heldout"}
    assert set(tables[0][tables[0].benchmark == "cub200"]["split"]) == {"target"}


def test_split_follows_the_run_tasks_by_name(tmp_path, stage_models):
    man = {"tasks": ["textvqa"], "stages": [{"index": 0, "task": None}, {"index": 1, "task": "textvqa"}]}
    tasks = B.run_tasks(man)
    mk = lambda n, s=None: B.Benchmark(n, Path("x.json"), split=s)   # noqa: E731
    assert B.split_of(mk("textvqa"), tasks) == "target"
    assert B.split_of(mk("textvqa_val"), tasks) == "target"
    assert B.split_of(mk("textvqa2"), tasks) == "heldout"
    assert B.split_of(mk("docvqa_val"), tasks) == "heldout"
    assert B.split_of(mk("docvqa_val", "target"), tasks) == "target"     # explicit wins


# -- bad input and failures ------------------------------------------------------------------------
def test_unknown_and_unscored_benchmarks_are_clear_errors(tmp_path, stage_models, capsys, monkeypatch):
    calls = plant(monkeypatch, lambda s, i: "")
    run = make_run(tmp_path, stage_models)
    assert main(["--ckpt-dir", str(run), "--benchmarks", "cub200,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) nope; valid: cub200, pixmocount, pathvqa, textvqa, timeclock, colour" in err
    # a run task found by the convention layout (no world.json) has a test file but no scorer
    run2 = make_run(tmp_path / "b", stage_models, world=False, benchmarks=())
    assert main(["--ckpt-dir", str(run2)]) == 2
    assert "no benchmarks to score" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(run2), "--benchmarks", "cub200"]) == 2
    err = capsys.readouterr().err
    assert "benchmark 'cub200'" in err and "has no scorer" in err and "--registry" in err
    # an unresolvable data.root does not block local benchmarks, and is named when a world name is asked for
    man = json.loads((run2 / "run.json").read_text())
    man["config"]["data"]["root"] = str(tmp_path / "gone")
    (run2 / "run.json").write_text(json.dumps(man))
    assert main(["--ckpt-dir", str(run2), "--benchmarks", "cub200"]) == 2
    assert "gone" in capsys.readouterr().err
    test = tmp_path / "b/world/tasks/cub200/test.json"
    assert main(["--ckpt-dir", str(run2), "--benchmark-file", f"cub200={test}", "--images",
                 str(tmp_path / "b/world/images"), "--scorer", "mc_letter"]) == 0
    assert set(pd.read_parquet(run2 / "evals.parquet")["split"]) == {"target"}
    # CLI mistakes
    assert main(["--ckpt-dir", str(run), "--benchmark-file", f"x={test}"]) == 2
    assert "give --scorer" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(run), "--benchmark-file", f"x={test}", "--scorer", "bleu"]) == 2
    assert "unknown scorer 'bleu'" in capsys.readouterr().err
    reg = tmp_path / "r.yaml"
    reg.write_text(f"x: {{test: {test}, scorer: exact, answers: 3}}\n")
    assert main(["--ckpt-dir", str(run), "--registry", str(reg)]) == 2
    assert "unknown keys ['answers']" in capsys.readouterr().err
    assert calls == [(8, 16), (8, 16)]           # only the run that had a scorer generated


def test_bad_benchmark_data_stops_before_any_model_runs(tmp_path, stage_models, capsys, monkeypatch):
    """With --strict; without it bad records are skipped and counted (tests/test_reliability.py)."""
    calls = plant(monkeypatch, lambda s, i: "")
    run = make_run(tmp_path, stage_models)
    d = tmp_path / "bad"
    d.mkdir()
    Image.new("RGB", (8, 8)).save(d / "a.png")

    def write(recs):
        (d / "t.json").write_text(json.dumps(recs))
        return ["--ckpt-dir", str(run), "--benchmark-file", f"b={d / 't.json'}", "--scorer", "clock", "--strict"]

    def rec(i, ans, image="a.png", **kw):
        return {"id": i, "image": image, "conversations": [
            {"from": "human", "value": "<image>\nTime?"}, {"from": "gpt", "value": ans}], **kw}
    assert main(write([rec("r0", "3:15"), rec("r1", "noon")])) == 2
    assert "record 'r1'" in (err := capsys.readouterr().err) and "'noon'" in err
    assert main(write([rec("r0", "3:15"), rec("r1", "3:20", image="missing.png")])) == 2
    assert "missing.png does not exist" in capsys.readouterr().err
    assert main(write([rec("r0", "3:15", answers=[])])) == 2
    assert "'answers' must be a non-empty list" in capsys.readouterr().err
    assert main(write([{"id": "r0", "conversations": [{"from": "human", "value": "x"}]}])) == 2
    assert "conversations must be (human, gpt) pairs" in capsys.readouterr().err
    assert calls == [] and not (run / "evals.parquet").exists()


def test_failed_checkpoint_others_still_scored_and_rerun_continues(tmp_path, stage_models, capsys, monkeypatch):
    plant(monkeypatch, lambda s, i: "")
    run = make_run(tmp_path, stage_models, tasks=("cub200", "pixmocount"))
    moved = tmp_path / "moved"
    shutil.move(run / "stage-01-cub200", moved)
    assert main(["--ckpt-dir", str(run)]) == 1
    captured = capsys.readouterr()
    assert f"{run / 'stage-01-cub200'}: checkpoint folder does not exist" in captured.err
    assert "FAILED" in captured.out
    assert sorted(set(pd.read_parquet(run / "evals.parquet")["stage"])) == [0, 2]
    shutil.move(moved, run / "stage-01-cub200")
    assert main(["--ckpt-dir", str(run)]) == 0
    df = pd.read_parquet(run / "evals.parquet")
    assert len(df) == 9 and sorted(set(df["stage"])) == [0, 1, 2]
    # pixmocount is a target now (stage 2 trains it); stage 1's row was written in the second run
    assert set(df[df.benchmark == "pixmocount"]["split"]) == {"target"}


def test_rows_for_another_subset_are_not_mixed_in(tmp_path, stage_models, capsys, monkeypatch):
    plant(monkeypatch, lambda s, i: "")
    run = make_run(tmp_path, stage_models, benchmarks=("colour",))
    assert main(["--ckpt-dir", str(run), "--limit", "2"]) == 0
    assert main(["--ckpt-dir", str(run)]) == 1
    assert "scored on 2 items" in capsys.readouterr().err
    assert set(pd.read_parquet(run / "evals.parquet")["n"]) == {2}
    assert main(["--ckpt-dir", str(run), "--replace"]) == 0
    assert set(pd.read_parquet(run / "evals.parquet")["n"]) == {8}
    # rows of other benchmarks (e.g. imported from lmms-eval) are kept
    table.append_evals(run / "evals.parquet", [{"run": "run", "stage": 0, "stage_name": "base", "task": None,
                                                "recipe": "full", "checkpoint": "stage-00-base", "benchmark": "ai2d",
                                                "split": "heldout", "metric": "exact_match", "score": 50.0,
                                                "n": None}])
    assert main(["--ckpt-dir", str(run), "--benchmarks", "colour,cub200"]) == 0
    df = pd.read_parquet(run / "evals.parquet")
    assert len(df) == 5 and df[df.benchmark == "ai2d"]["n"].isna().all()


def test_torchrun_two_processes_give_the_same_table_as_one(tmp_path, stage_models):
    run = make_run(tmp_path, stage_models, benchmarks=("cub200", "timeclock"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    args = ["-m", "probes.evaluate", "--ckpt-dir", str(run), "--max-new-tokens", "6", "--batch-size", "2",
            "--save-predictions"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.parquet")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    first = {p.relative_to(run): p.read_text() for p in (run / "predictions").rglob("*.jsonl")}
    shutil.rmtree(run / "predictions")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                          *args, "--out", str(tmp_path / "two.parquet")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert len(a) == 4
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert {p.relative_to(run): p.read_text() for p in (run / "predictions").rglob("*.jsonl")} == first


# -- benchmarks from presets ------------------------------------------------------------------------
def _preset_snapshot(root: Path, n: int) -> Path:
    """A Hub-style ai2d snapshot (data/test-*.parquet, images as {bytes, path}) of n rows, answers cycling A-C."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "data").mkdir(parents=True)
    images = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (40 * i % 256, 0, 0)).save(buf, format="PNG")
        images.append({"bytes": buf.getvalue(), "path": None})
    pq.write_table(pa.table({"question": [f"Question {i}?" for i in range(n)],
                             "options": [["cow", "lion", "snake"]] * n, "answer": [str(i % 3) for i in range(n)],
                             "image": pa.array(images, type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}),
                   root / "data" / "test-00000-of-00001.parquet")
    return root


def test_presets_score_as_lmms_eval_and_record_profile(tmp_path, stage_models, monkeypatch, capsys):
    """--preset alone scores only the presets (not run.json's benchmarks); the study profile's ai2d scorer
    reads "(B)" as B; planted answers right on rows 0, 2, 4 of 6 -> 50.0; the profile is recorded and a
    rerun with the other profile does not mix rows."""
    run = make_run(tmp_path, stage_models)
    ai2d = _preset_snapshot(tmp_path / "ai2d", 6)
    prompts = []

    def answer(sample, i):
        prompts.append(sample.instruction)
        row = int(sample.id.split("/")[1])
        return f"({'ABC'[row % 3]})" if row % 2 == 0 else "The answer is A"
    calls = plant(monkeypatch, answer)
    assert main(["--ckpt-dir", str(run), "--preset", f"ai2d={ai2d}", "--profile", "study"]) == 0, \
        capsys.readouterr().err
    df = pd.read_parquet(run / "evals.parquet")
    assert set(df["benchmark"]) == {"ai2d"} and set(calls) == {(6, 16)}
    assert df[["score", "metric", "split", "n", "preset", "profile"]].drop_duplicates().values.tolist() == [
        [50.0, "lmms_ai2d", "heldout", 6, "ai2d", "study"]]
    assert prompts[0] == ("Question 0?\nA. cow\nB. lion\nC. snake\n"
                          "Answer with the option's letter from the given choices directly.")
    items = pd.read_parquet(run / "items.parquet")
    assert len(items) == 2 * 6 and list(items.columns) == ["run", "stage", "benchmark", "item_id", "prediction",
                                                           "score", "metric"]
    stage0 = items[items.stage == 0]
    assert stage0["item_id"].tolist() == [str(i) for i in range(6)]     # sorted as strings; 6 rows: 0..5
    assert stage0["score"].tolist() == [1.0, 0.0] * 3 and stage0["prediction"].iloc[2] == "(C)"
    rc = main(["--ckpt-dir", str(run), "--preset", f"ai2d={ai2d}"])   # same scorer, other profile: a clash
    assert rc == 1 and "(heldout, study profile)" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(run), "--preset", f"ai2d={ai2d}", "--replace", "--limit", "4"]) == 0
    df = pd.read_parquet(run / "evals.parquet")
    assert df[["score", "n", "profile"]].drop_duplicates().values.tolist() == [[50.0, 4, "lmms-eval"]]


def test_presets_with_real_generation_and_bad_input(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models, tasks=())
    ai2d = _preset_snapshot(tmp_path / "ai2d", 3)
    assert main(["--ckpt-dir", str(run), "--preset", f"ai2d={ai2d}", "--max-new-tokens", "3"]) == 0
    df = pd.read_parquet(run / "evals.parquet")
    assert len(df) == 1 and df.loc[0, "n"] == 3 and 0.0 <= df.loc[0, "score"] <= 100.0
    assert main(["--ckpt-dir", str(run), "--preset", f"ai2d_test={ai2d}"]) == 2
    assert "unknown preset 'ai2d_test'" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(run), "--preset", f"docvqa={ai2d}"]) == 2   # no validation split there
    assert "no parquet file of split 'validation'" in capsys.readouterr().err


def test_run_config_presets_are_scored_with_run_benchmarks(tmp_path, stage_models, monkeypatch, capsys):
    """Without flags: run.json's benchmarks plus the config's eval.presets in its eval.profile; a benchmark
    name a preset covers (here ai2d) is not also resolved as a LLaVA file."""
    run = make_run(tmp_path, stage_models, benchmarks=("cub200", "ai2d"))
    ai2d = _preset_snapshot(tmp_path / "ai2d", 3)
    man = json.loads((run / "run.json").read_text())
    man["config"]["eval"] = {"presets": {"ai2d": str(ai2d)}, "profile": "study"}
    (run / "run.json").write_text(json.dumps(man))
    plant(monkeypatch, lambda sample, i: "A")
    assert main(["--ckpt-dir", str(run)]) == 0, capsys.readouterr().err
    df = pd.read_parquet(run / "evals.parquet")
    assert sorted(set(df["benchmark"])) == ["ai2d", "cub200"]
    assert set(df[df.benchmark == "ai2d"]["profile"]) == {"study"} and set(df[df.benchmark == "ai2d"]["n"]) == {3}


def test_run_config_presets_covering_every_benchmark_need_no_other(tmp_path, stage_models, monkeypatch, capsys):
    """The 7-8B configs name every benchmark by a preset: nothing is left to resolve as a LLaVA file."""
    run = make_run(tmp_path, stage_models, benchmarks=("ai2d",))
    man = json.loads((run / "run.json").read_text())
    man["config"]["eval"] = {"presets": {"ai2d": str(_preset_snapshot(tmp_path / "ai2d", 3))}}
    (run / "run.json").write_text(json.dumps(man))
    plant(monkeypatch, lambda sample, i: "A")
    assert main(["--ckpt-dir", str(run)]) == 0, capsys.readouterr().err
    assert set(pd.read_parquet(run / "evals.parquet")["benchmark"]) == {"ai2d"}
