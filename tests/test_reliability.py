"""Reliability and security (docs/reliability.md lists each guarantee next to the test that proves it):
interrupted runs, two writers, damaged checkpoints, damaged data, NaN/inf logits, batch invariance of the
evaluation on every family, pickle weights, remote code, and image paths that try to leave their root."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from probes import benchmarks as B
from probes import table
from probes.captions import CaptionDataError, Sample, load_captions
from probes.engine import Engine
from probes.evaluate import main as evaluate
from probes.lmms_eval_import import main as lmms_import
from probes.run import main as probe
from probes.stats import NonFiniteLogits
from training import run as run_mod
from training.checkpoints import LoadOptions, load, save_delta
from training.data import ConversationDataset, DataError, TaskFiles
from training.families import FAMILIES, CheckpointError

from .conftest import FAMILY_NAMES
from .llava_fixture import write_llava_root

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           PYTHONPATH=str(REPO))
CAPTIONS = ["a red square and two blue circles", "there are 12 small dots", "the clock shows 10:45",
            "a cat sitting on a wooden table at 9", "Seventeen people stand in a row of twenty chairs",
            "a large purple hexagon at the top left corner"]
KEY = ["stage", "probe", "mode"]
EVAL_KEY = ["stage", "benchmark"]



@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three tiny qwen checkpoints (seeds 0..2), saved once; tests copy them into their own runs."""
    root = tmp_path_factory.mktemp("rel-models")
    for s in range(3):
        FAMILIES["qwen2_5_vl"].save_tiny(root / f"s{s}", seed=s)
    return root


def caption_record(i: int, image: str | None = None, caption: str | None = None) -> dict:
    return {"id": f"r{i}", "image": image or f"{i:03d}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)] if caption is None else caption}]}


def write_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16 + 5 * i, 40 - 2 * i), (i * 25, 90, 200 - i * 10)).save(folder / f"{i:03d}.png")
    return folder


def make_run(root: Path, models: Path, n_stages: int = 3) -> Path:
    """A run directory shaped like training.run's: stages copied from `models`, a 9-record caption set,
    and the synthetic world (tests/llava_fixture.py) for its benchmarks cub200 and colour."""
    write_images(root / "imgs", 9)
    (root / "caps.json").write_text(json.dumps([caption_record(i) for i in range(9)]))
    world = write_llava_root(root / "world", n=4, world=True)
    run = root / "run"
    stages = []
    for s in range(n_stages):
        name = "base" if s == 0 else f"task{s}"
        stages.append({"index": s, "name": name, "task": None if s == 0 else "cub200", "path": f"stage-{s:02d}-{name}"})
        shutil.copytree(models / f"s{s % 3}", run / stages[-1]["path"])
    (run / "run.json").write_text(json.dumps({
        "family": "qwen2_5_vl", "recipe": "full", "base": "tiny", "tasks": ["cub200"],
        "config": {"data": {"root": str(world)}}, "stages": stages, "benchmarks": ["cub200", "colour"],
        "captions": {"path": str(root / "caps.json"), "images": str(root / "imgs")}}))
    return run


def sorted_table(path: Path, key=KEY) -> pd.DataFrame:
    return pd.read_parquet(path).sort_values(key).reset_index(drop=True)


# -- interruption: kill -9 while the table is being written, then rerun ---------------------------------
DYING = """
import os, signal, sys
import pandas as pd
real, calls = pd.DataFrame.to_parquet, [0]
def dying(self, path, *a, **k):   # the KILL_AT-th table write: half the file, then SIGKILL
    calls[0] += 1
    real(self, path, *a, **k)
    if calls[0] == int(os.environ["KILL_AT"]):
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
pd.DataFrame.to_parquet = dying
from probes.{module} import main
sys.exit(main(sys.argv[1:]))
"""


def killed_mid_write(tmp_path: Path, module: str, kill_at: int, args: list[str]) -> subprocess.CompletedProcess:
    script = tmp_path / f"dying_{module}.py"
    script.write_text(DYING.replace("{module}", module))
    res = subprocess.run([sys.executable, str(script), *args], env=dict(ENV, KILL_AT=str(kill_at)), cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    return res


def test_probes_run_killed_while_writing_then_rerun_equals_an_uninterrupted_run(tmp_path, models, capsys):
    run = make_run(tmp_path, models)
    assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "ref.parquet")]) == 0
    ref = sorted_table(tmp_path / "ref.parquet")
    assert len(ref) == 9

    killed_mid_write(tmp_path, "run", 2, ["--ckpt-dir", str(run)])     # dies writing stage 1's rows
    left = sorted_table(run / "probes.parquet")
    # (all-null "task" reads back as object, not string: compare values)
    pd.testing.assert_frame_equal(left, ref[ref.stage == 0].reset_index(drop=True), check_exact=True,
                                  check_dtype=False)
    stale = list(run.glob(".probes.parquet.*.tmp"))
    assert len(stale) == 1, "the kill should land while the temporary table is being written"

    capsys.readouterr()
    assert probe(["--ckpt-dir", str(run)]) == 0
    assert capsys.readouterr().out.count("skipped (already in the table)") == 1
    got = sorted_table(run / "probes.parquet")
    assert not got.duplicated(KEY).any()
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert not list(run.glob(".probes.parquet.*.tmp"))               # the next writer removed it


def test_probes_evaluate_killed_while_writing_then_rerun_equals_an_uninterrupted_run(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=2)
    args = ["--ckpt-dir", str(run), "--max-new-tokens", "4"]
    assert evaluate([*args, "--out", str(tmp_path / "ref.parquet")]) == 0
    ref = sorted_table(tmp_path / "ref.parquet", EVAL_KEY)
    assert len(ref) == 4

    # each benchmark writes its items, then its row: stage 0's two rows are written; dies on stage 1's first row
    killed_mid_write(tmp_path, "evaluate", 6, args)
    left = sorted_table(run / "evals.parquet", EVAL_KEY)
    pd.testing.assert_frame_equal(left, ref[ref.stage == 0].reset_index(drop=True), check_exact=True,
                                  check_dtype=False)
    assert len(list(run.glob(".evals.parquet.*.tmp"))) == 1

    assert evaluate(args) == 0
    got = sorted_table(run / "evals.parquet", EVAL_KEY)
    assert not got.duplicated(EVAL_KEY).any()
    pd.testing.assert_frame_equal(got, ref, check_exact=True)
    assert not list(run.glob(".evals.parquet.*.tmp"))
    items_key = ["stage", "benchmark", "item_id"]         # the killed attempt's items were replaced, not doubled
    items, ref_items = (pd.read_parquet(p).sort_values(items_key).reset_index(drop=True)
                        for p in (run / "items.parquet", tmp_path / "ref.items.parquet"))
    assert not items.duplicated(items_key).any()
    pd.testing.assert_frame_equal(items.drop(columns="run"), ref_items.drop(columns="run"), check_exact=True)


# -- two writers ---------------------------------------------------------------------------------------
def test_a_second_command_on_the_same_table_is_refused(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=1)
    assert probe(["--ckpt-dir", str(run)]) == 0
    before = (run / "probes.parquet").read_bytes()
    capsys.readouterr()
    with table.RunLock(run / "probes.parquet", "probes.run"):          # as another process would hold it
        assert probe(["--ckpt-dir", str(run), "--replace"]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'probes.parquet'} is being written by probes.run (pid {os.getpid()})" in err
        with table.RunLock(run / "evals.parquet", "probes.evaluate"):
            assert evaluate(["--ckpt-dir", str(run)]) == 2
            assert "is being written by probes.evaluate" in capsys.readouterr().err
        assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "other.parquet")]) == 0   # another table
    assert (run / "probes.parquet").read_bytes() == before
    assert probe(["--ckpt-dir", str(run)]) == 0                          # released: a rerun goes on


def test_two_probe_processes_at_once_never_corrupt_the_table(tmp_path, models):
    run = make_run(tmp_path, models)
    assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "ref.parquet")]) == 0
    cmd = [sys.executable, "-m", "probes.run", "--ckpt-dir", str(run)]
    procs = [subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes in ([0, 0], [0, 2]), [o[1][-2000:] for o in outs]
    if codes == [0, 2]:                                  # they overlapped: the second one was refused
        assert any("is being written by probes.run (pid" in err for _, err in outs)
    pd.testing.assert_frame_equal(sorted_table(run / "probes.parquet"), sorted_table(tmp_path / "ref.parquet"),
                                  check_exact=True)


def _append_many(path: str, who: int, n: int) -> None:
    for k in range(n):
        table.append_evals(path, [{"run": "r", "stage": who, "stage_name": f"s{who}", "task": None, "recipe": "x",
                                   "checkpoint": f"c{who}", "benchmark": f"b{k}", "split": "heldout",
                                   "metric": "exact", "score": float(k), "n": 1}])


def test_concurrent_appends_lose_no_rows_and_lmms_import_waits_for_the_lock(tmp_path):
    import multiprocessing as mp

    out = tmp_path / "run" / "evals.parquet"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(out), who, 8)) for who in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    df = pd.read_parquet(out)
    assert len(df) == 24 and not df.duplicated(EVAL_KEY).any()

    # lmms_eval_import writes through the same lock: while it is held the import waits, then keeps every row
    run = out.parent
    (run / "run.json").write_text(json.dumps({"family": "qwen2_5_vl", "recipe": "x", "base": "b", "tasks": [],
                                              "config": {}, "stages": [{"index": 0, "name": "base", "task": None,
                                                                        "path": "stage-00-base"}]}))
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"results": {"chartqa": {"relaxed_overall,none": 0.5}}}))
    codes = []
    with table._lock(out):
        t = threading.Thread(target=lambda: codes.append(lmms_import(["--run-dir", str(run), "--results",
                                                                      f"0={res}"])))
        t.start()
        t.join(2.0)
        assert t.is_alive() and len(pd.read_parquet(out)) == 24, "the import did not wait for the table's lock"
    t.join(60)
    assert codes == [0]
    df = pd.read_parquet(out)
    assert len(df) == 25 and df[df.benchmark == "chartqa"]["score"].tolist() == [50.0]


# -- damaged checkpoints ---------------------------------------------------------------------------------
def damage(run: Path, models: Path, tmp_path: Path) -> dict[str, str]:
    """Stages 1-4 damaged four ways; stages 0 and 5 whole. Returns stage folder -> the error it must give."""
    st = {s["index"]: run / s["path"] for s in json.loads((run / "run.json").read_text())["stages"]}
    w = st[1] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])                       # truncated weights
    (st[2] / "config.json").unlink()                                             # no config
    for f in st[3].glob("tokenizer*"):                                           # no tokenizer
        f.unlink()
    shutil.rmtree(st[4])                                                         # a delta whose base is gone
    model, processor = load(models / "s1")
    shutil.copytree(models / "s1", tmp_path / "gone-base")
    save_delta(model, processor, st[4], tmp_path / "gone-base", [], FAMILIES["qwen2_5_vl"])
    shutil.rmtree(tmp_path / "gone-base")
    return {str(st[1]): f"{st[1]}: cannot load the model weights (SafetensorError",
            str(st[2]): f"{st[2]}: not a checkpoint (no config.json",
            str(st[3]): f"{st[3]}: no tokenizer",
            str(st[4]): f"{st[4]}: its base checkpoint {tmp_path / 'gone-base'} does not exist"}


@pytest.mark.parametrize("command", ["probes.run", "probes.evaluate"])
def test_damaged_checkpoints_are_named_and_the_others_still_done(command, tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=6)
    expected = damage(run, models, tmp_path)
    main, table_name = (probe, "probes.parquet") if command == "probes.run" else (evaluate, "evals.parquet")
    assert main(["--ckpt-dir", str(run), "--max-new-tokens", "3"]) == 1
    err = capsys.readouterr().err
    for folder, message in expected.items():
        assert message in err, (folder, err[-3000:])
        assert f"({folder}) FAILED" in err
    assert f"{command}: 4 checkpoint(s) failed" in err
    assert sorted(set(pd.read_parquet(run / table_name)["stage"])) == [0, 5]


# -- damaged data ------------------------------------------------------------------------------------------
def bad_caption_file(root: Path) -> tuple[Path, Path]:
    """JSONL with every kind of bad record between good ones: record i is good iff i in GOOD."""
    images = write_images(root / "imgs", 12)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (root / "outside.png").write_bytes((images / "000.png").read_bytes())
    (images / "link.png").symlink_to(root / "outside.png")
    lines = [json.dumps(caption_record(0)).encode(),
             b'{"id": "r1", "image": "001.png", "conversations": [oops',                  # malformed JSON
             json.dumps(caption_record(2)).encode(),
             json.dumps(caption_record(3, caption="  ")).encode(),                       # empty caption
             json.dumps(caption_record(4, image="missing.png")).encode(),                # missing image
             json.dumps(caption_record(5, image="corrupt.png")).encode(),                # unreadable image
             json.dumps(caption_record(6, caption="a cat")).encode().replace(b"a cat", b"a \xff cat"),  # not UTF-8
             json.dumps(caption_record(7, image="../../etc/passwd")).encode(),           # escapes the root
             json.dumps(caption_record(8, image="/etc/passwd")).encode(),                # absolute
             json.dumps(caption_record(9, image="link.png")).encode(),                   # symlink out
             json.dumps(caption_record(10)).encode(),
             json.dumps(caption_record(11)).encode()]
    (root / "caps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "caps.jsonl", images


GOOD = [0, 2, 10, 11]
REASONS = ["malformed JSON on line 1", "record 'r3' has an empty caption", "missing.png does not exist",
           "record 'r5': cannot read image 'corrupt.png' (cannot identify image file", "line 1 is not valid UTF-8",
           "image path '../../etc/passwd' must be relative", "image path '/etc/passwd' must be relative",
           "image 'link.png' resolves outside the images root"]


def test_bad_caption_records_are_skipped_counted_and_named_or_fail_with_strict(tmp_path):
    path, images = bad_caption_file(tmp_path)
    cs = load_captions(path, images, num_samples=4, strict=False)
    assert [s.id for s in cs.samples] == [f"r{i}" for i in GOOD]           # the first 4 good records
    assert cs.n_skipped == 8 and "malformed JSON on line 2" in cs.first_skipped and "caps.jsonl" in cs.first_skipped
    assert "skipped 8 bad caption record(s)" in cs.report()
    # the hash is that of the exact subset used: equal to a file holding only those records
    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps([caption_record(i) for i in GOOD]))
    assert cs.hash == load_captions(clean, images).hash
    # every kind of bad record is found, one at a time (line 1 of a file of its own), and strict names it
    for i, reason in zip([1, 3, 4, 5, 6, 7, 8, 9], REASONS):
        one = tmp_path / f"one{i}.jsonl"
        one.write_bytes(path.read_bytes().splitlines()[i] + b"\n" + json.dumps(caption_record(0)).encode())
        if i == 1:     # a malformed line carries no id; the good record after it still loads
            assert [s.id for s in load_captions(one, images, strict=False).samples] == ["r0"]
        with pytest.raises(CaptionDataError) as e:
            load_captions(one, images)
        assert reason in str(e.value), (i, str(e.value))
        assert load_captions(one, images, strict=False).n_skipped == 1
    with pytest.raises(CaptionDataError, match=r"2 bad record\(s\) among the 4 selected; the first: .*line 2"):
        load_captions(path, images, num_samples=4, strict=True)
    # first N good records: asking for more than there are is an error that names the count
    with pytest.raises(CaptionDataError, match=r"asked for 5 samples but only 4 of its 12 records are usable"):
        load_captions(path, images, num_samples=5, strict=False)
    # random: N good records, reproducible; without bad records the same draw as strict
    a = load_captions(path, images, num_samples=3, sample="random", seed=3, strict=False)
    b = load_captions(path, images, num_samples=3, sample="random", seed=3, strict=False)
    assert [s.id for s in a.samples] == [s.id for s in b.samples] and {s.id for s in a.samples} <= {"r0", "r2", "r10",
                                                                                                   "r11"}
    assert load_captions(clean, images, 2, "random", 1, strict=False).hash == load_captions(clean, images, 2, "random",
                                                                                           1).hash
    # a JSON list (not lines) with bytes that are not UTF-8 inside one caption: that record only
    recs = json.dumps([caption_record(i) for i in range(3)]).encode().replace(b"there are", b"there \xff are")
    (tmp_path / "list.json").write_bytes(recs)
    assert [s.id for s in load_captions(tmp_path / "list.json", images, 2, strict=False).samples] == ["r0", "r2"]
    with pytest.raises(CaptionDataError, match="record 'r1' has text that is not valid UTF-8"):
        load_captions(tmp_path / "list.json", images, 2)


def test_probes_run_reports_skipped_captions_and_strict_fails(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=1)
    path, images = bad_caption_file(tmp_path / "bad")
    args = ["--ckpt-dir", str(run), "--captions", str(path), "--images", str(images), "--num-samples", "4"]
    assert probe([*args, "--strict"]) == 2
    assert "2 bad record(s) among the 4 selected" in capsys.readouterr().err
    assert not (run / "probes.parquet").exists()
    assert probe(args) == 0
    err = capsys.readouterr().err
    assert "warning: skipped 8 bad caption record(s)" in err and "malformed JSON on line 2" in err
    df = pd.read_parquet(run / "probes.parquet")
    assert set(df["n_samples"]) == {4}
    assert set(df["dataset_hash"]) == {load_captions(path, images, 4, strict=False).hash}


def test_probes_evaluate_skips_counts_and_strict_fails_on_bad_benchmark_records(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=1)
    d = tmp_path / "bench"
    write_images(d, 3)
    (d / "corrupt.png").write_bytes(b"GIF89a broken")

    def rec(i, ans="3:15", image="000.png"):
        return json.dumps({"id": f"q{i}", "image": image, "conversations": [
            {"from": "human", "value": "<image>\nTime?"}, {"from": "gpt", "value": ans}]}).encode()
    lines = [rec(0), b"{broken", rec(2, "noon"), rec(3, image="corrupt.png"), rec(4, image="../../etc/passwd"),
             rec(5).replace(b"Time?", b"Ti\xffme?"), rec(6), rec(7)]
    (d / "t.jsonl").write_bytes(b"\n".join(lines))
    args = ["--ckpt-dir", str(run), "--benchmark-file", f"clocks={d / 't.jsonl'}", "--scorer", "clock",
            "--max-new-tokens", "2"]
    capsys.readouterr()
    assert evaluate([*args, "--strict"]) == 2
    assert "malformed JSON on line 2" in capsys.readouterr().err and not (run / "evals.parquet").exists()
    assert evaluate([*args, "--limit", "2"]) == 0                    # the first 2 good records: q0, q6
    err = capsys.readouterr().err
    assert "clocks: skipped 5 bad record(s)" in err and "malformed JSON on line 2" in err
    assert pd.read_parquet(run / "evals.parquet").set_index("benchmark").loc["clocks", "n"] == 2
    data = B.load(B.Benchmark("clocks", d / "t.jsonl", scorer="clock"), strict=False)
    assert [it.record_id for it in data.items] == ["q0", "q6", "q7"] and data.n_skipped == 5
    for i, reason in [(2, "record 'q2': clock reference 'noon'"), (3, "record 'q3': cannot read image 'corrupt.png' (cannot identify"),
                      (4, "image path '../../etc/passwd' must be relative"),
                      (5, "line 1 is not valid UTF-8")]:
        (d / "one.jsonl").write_bytes(lines[i] + b"\n" + lines[0])
        with pytest.raises(B.BenchmarkError) as e:
            B.load(B.Benchmark("one", d / "one.jsonl", scorer="clock"))
        assert reason in str(e.value), str(e.value)
        assert B.load(B.Benchmark("one", d / "one.jsonl", scorer="clock"), strict=False).n_skipped == 1


# -- numbers -------------------------------------------------------------------------------------------------
def nan_on(model, processor, word: str):
    """A copy of `model` whose input embedding of `word`'s tokens, less those any other sample here uses, is
    NaN: only the sequences holding `word` break."""
    import copy

    from training.chat import encode

    tok = processor.tokenizer
    used = set(encode(processor, Image.new("RGB", (24, 24)), "Describe the image briefly. What is this?",
                      " ".join(CAPTIONS).replace("9", "") + " Is it? a red square blue circle giraffe star").input_ids.tolist())
    ids = sorted(set(tok(" " + word, add_special_tokens=False)["input_ids"]) - used)
    assert ids, f"{word!r} has no token of its own"
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[ids] = float("nan")
    return model


def test_nan_or_inf_logits_stop_with_the_sample_named(tiny_models):
    model, processor = tiny_models("qwen2_5_vl")
    im = Image.new("RGB", (24, 24), (10, 200, 30))
    samples = [Sample(f"s{i}", "Describe the image.", c, im) for i, c in enumerate(["a red square", "a blue circle",
                                                                                    "a giraffe at 9", "a red star"])]
    bad = nan_on(model, processor, "9")
    for bs in (1, 4):
        with pytest.raises(NonFiniteLogits, match="sample 's2': NaN or infinite logits"):
            Engine(bad, processor).teacher_forced(samples, batch_size=bs)
    asking = [Sample(f"g{i}", q, None, im) for i, q in enumerate(["What is this?", "Is it 9?", "Describe it."])]
    for bs in (1, 3):
        with pytest.raises(NonFiniteLogits, match="sample 'g1': NaN or infinite logits"):
            Engine(bad, processor, token_sets=()).generate(asking, batch_size=bs, max_new_tokens=3)
    import copy

    inf = copy.deepcopy(model)                    # one output row so large that its logit overflows to inf
    with torch.no_grad():
        inf.lm_head.weight[7] = 3e38
    with pytest.raises(NonFiniteLogits, match="sample 'g[012]': NaN or infinite logits"):
        Engine(inf, processor, token_sets=()).generate(asking, batch_size=3, max_new_tokens=2)
    with pytest.raises(NonFiniteLogits, match="sample 's[0-3]': NaN or infinite logits"):
        Engine(inf, processor).teacher_forced(samples, batch_size=4)
    # the healthy model gives finite values for the same samples
    assert len(Engine(model, processor).teacher_forced(samples, batch_size=4)) == 4


def test_nan_checkpoint_fails_with_checkpoint_and_sample_named(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=3)
    stage1 = run / "stage-01-task1"
    model, processor = load(stage1)
    shutil.rmtree(stage1)
    bad = nan_on(model, processor, "9")
    bad.save_pretrained(stage1)
    processor.save_pretrained(stage1)
    assert probe(["--ckpt-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"stage 1 ({stage1}) FAILED: NonFiniteLogits: sample 'r3': NaN or infinite logits (teacher-forced" in err
    assert sorted(set(pd.read_parquet(run / "probes.parquet")["stage"])) == [0, 2]


# -- batch invariance of the evaluation, on every family ------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_evaluation_is_batch_and_padding_invariant_on_every_family(name, tmp_path, tiny_checkpoints, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoints(name), run / "stage-00-base")
    (run / "run.json").write_text(json.dumps({"family": name, "recipe": "full", "tasks": [], "config": {},
                                              "stages": [{"index": 0, "name": "base", "task": None,
                                                          "path": "stage-00-base"}]}))
    d = tmp_path / "bench"
    d.mkdir()
    recs = []
    for i in range(33):          # sizes and prompt lengths vary, so batches of 32 pad on either side
        Image.new("RGB", (12 + 3 * i % 70, 70 - 2 * i % 50), (7 * i % 256, 90, 200 - 5 * i)).save(d / f"{i}.png")
        recs.append({"id": f"q{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nHow many squares are there?" + " Count them." * (i % 4)},
            {"from": "gpt", "value": str(i % 7)}]})
    (d / "test.json").write_text(json.dumps(recs))
    common = ["--ckpt-dir", str(run), "--benchmark-file", f"count={d / 'test.json'}", "--scorer", "integer",
              "--max-new-tokens", "5", "--save-predictions"]
    tables, preds = [], []
    for k, (bs, side) in enumerate([(1, "left"), (32, "left"), (32, "right"), (1, "right")]):
        assert evaluate([*common, "--batch-size", str(bs), "--padding-side", side,
                         "--out", str(tmp_path / f"{k}.parquet")]) == 0
        tables.append(pd.read_parquet(tmp_path / f"{k}.parquet"))
        preds.append((run / "predictions" / "stage-00-base" / "count.jsonl").read_text())
    texts = [json.loads(x)["prediction"] for x in preds[0].splitlines()]
    assert len(texts) == 33 and len(set(texts)) > 1, "the tiny model must say different things"
    for t, p in zip(tables[1:], preds[1:]):
        pd.testing.assert_frame_equal(t, tables[0], check_exact=True)
        assert p == preds[0]


# -- security: pickle, remote code, image paths -----------------------------------------------------------
def pickle_only(src: Path, dst: Path, payload=None) -> Path:
    """A copy of checkpoint `src` whose weights are pytorch_model.bin (torch.save), or `payload` pickled."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    torch.save(sd if payload is None else payload, dst / "pytorch_model.bin")
    return dst


class Hostile:
    """A pickle that runs a command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_weights_refused_unless_allowed_then_weights_only(tmp_path, models, capsys):
    run = make_run(tmp_path, models, n_stages=3)
    marker = tmp_path / "pwned"
    pickle_only(models / "s1", run / "stage-01-task1.tmp")
    shutil.rmtree(run / "stage-01-task1")
    (run / "stage-01-task1.tmp").rename(run / "stage-01-task1")
    shutil.rmtree(run / "stage-02-task2")
    pickle_only(models / "s2", run / "stage-02-task2", payload={"w": Hostile(marker)})
    assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "a.parquet")]) == 1
    err = capsys.readouterr().err
    for s in ("stage-01-task1", "stage-02-task2"):
        assert f"{run / s}: only pickle weights (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "b.parquet"), "--allow-pickle"]) == 1
    err = capsys.readouterr().err
    assert f"stage 2 ({run / 'stage-02-task2'}) FAILED" in err and "Weights only load failed" in err
    assert not marker.exists(), "a pickle ran code"
    # the honest pickle loads (weights_only) to the very model its safetensors twin holds
    b = pd.read_parquet(tmp_path / "b.parquet")
    assert sorted(set(b["stage"])) == [0, 1]
    twin = make_run(tmp_path / "twin", models, n_stages=2)
    assert probe(["--ckpt-dir", str(twin), "--out", str(tmp_path / "c.parquet")]) == 0
    cols = ["stage", "probe", "mode", "mean", "std", "n_positions", "dataset_hash"]
    pd.testing.assert_frame_equal(b[cols].sort_values(KEY).reset_index(drop=True),
                                  sorted_table(tmp_path / "c.parquet")[cols], check_exact=True)
    # probes.evaluate takes the same flag (training.run: the next test)
    assert evaluate(["--ckpt-dir", str(run), "--max-new-tokens", "2"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()
    # a PEFT adapter with pickle weights only is refused before peft would torch.load it
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(models / "s0"),
                                                             "peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["q_proj"]}))
    torch.save({"w": Hostile(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=f"{adapter}: no adapter_model.safetensors.*--allow-pickle"):
        load(adapter)
    with pytest.raises(Exception, match="Weights only load failed"):
        load(adapter, LoadOptions(allow_pickle=True))
    assert not marker.exists()


def test_training_reads_a_pickle_base_only_with_allow_pickle(tmp_path, models, capsys):
    base = pickle_only(models / "s0", tmp_path / "base")
    root = write_llava_root(tmp_path / "data", n=4, tasks=["cub200"], multi_turn_task=None)
    argv = ["--config", "toy-tiny", "--out", str(tmp_path / "run"), f"base={base}", f"data.root={root}",
            "tasks=[cub200]", "train.max_steps=1", "train.batch_size=2", "train.progress=false"]
    assert run_mod.main(argv) == 2
    assert f"{base}: only pickle weights (pytorch_model.bin)" in capsys.readouterr().err
    assert run_mod.main([*argv, "--allow-pickle"]) == 0
    assert (tmp_path / "run" / "stage-01-cub200" / "model.safetensors").is_file()


def hostile_code(ck: Path, marker: Path) -> Path:
    """Point the checkpoint's auto_map at a module that writes `marker` when imported."""
    (ck / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor\n"
        "class EvilConfig(Qwen2_5_VLConfig): pass\n"
        "class EvilModel(Qwen2_5_VLForConditionalGeneration): config_class = EvilConfig\n"
        "class EvilProcessor(Qwen2_5_VLProcessor): pass\n")
    for f, auto in [("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModelForImageTextToText": "evil.EvilModel"}),
                    ("processor_config.json", {"AutoProcessor": "evil.EvilProcessor"}),
                    ("tokenizer_config.json", {"AutoProcessor": "evil.EvilProcessor"})]:
        cfg = json.loads((ck / f).read_text())
        (ck / f).write_text(json.dumps(cfg | {"auto_map": auto}))
    return ck


def test_remote_code_never_runs_unless_asked(tmp_path, models, capsys, monkeypatch):
    run = make_run(tmp_path, models, n_stages=2)
    marker = tmp_path / "remote-code-ran"
    hostile_code(run / "stage-01-task1", marker)
    assert probe(["--ckpt-dir", str(run)]) == 0
    assert evaluate(["--ckpt-dir", str(run), "--max-new-tokens", "2"]) == 0
    root = write_llava_root(tmp_path / "data", n=4, tasks=["cub200"], multi_turn_task=None)
    assert run_mod.main(["--config", "toy-tiny", "--out", str(tmp_path / "trained"), f"base={run / 'stage-01-task1'}",
                         f"data.root={root}", "tasks=[cub200]", "train.max_steps=1", "train.batch_size=2",
                         "train.progress=false"]) == 0
    assert not marker.exists(), "the checkpoint's own code ran without --trust-remote-code"
    # the fixture is really hostile: asked to trust it, the code runs (its module cache kept in tmp_path)
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    capsys.readouterr()
    assert probe(["--ckpt-dir", str(run), "--out", str(tmp_path / "t.parquet"), "--trust-remote-code"]) == 0
    assert marker.read_text() == "ran"


def test_training_image_paths_cannot_escape_the_root(tmp_path, tiny_models):
    _, processor = tiny_models("qwen2_5_vl")
    root = write_llava_root(tmp_path / "data", n=2, tasks=["cub200"], multi_turn_task=None)
    (tmp_path / "secret.png").write_bytes((root / "images" / "red" / "0000.png").read_bytes())
    (root / "images" / "link.png").symlink_to(tmp_path / "secret.png")
    train = root / "tasks" / "cub200" / "train.json"
    good = json.loads(train.read_text())
    for image, message in [("../../secret.png", "must be relative to the images root"),
                           (str(tmp_path / "secret.png"), "must be relative to the images root"),
                           ("link.png", "resolves outside the images root"),
                           ("red/none.png", "does not exist")]:
        train.write_text(json.dumps(good + [dict(good[0], id="evil", image=image)]))
        with pytest.raises(DataError, match=f"record 2 \\(id 'evil'\\).*{message}"):
            ConversationDataset.from_task(TaskFiles("cub200", train, root / "images"), processor)
    ds = ConversationDataset(good + [dict(good[0], id="evil", image="../../secret.png")], processor, root / "images")
    with pytest.raises(DataError, match="must be relative"):
        ds[2]
    assert len(ConversationDataset.from_task(TaskFiles("cub200", train.with_name("test.json"), root / "images"),
                                             processor)) == 8
