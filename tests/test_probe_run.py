"""`python -m probes.run`: discovery, the table contract, resuming, several processes, and bad input."""
import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from probes.captions import load_captions
from probes.discover import discover
from probes.engine import Engine
from probes.run import main
from probes.schemas import PROBES
from training.checkpoints import load, save_delta, save_full
from training.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square and two blue circles", "there are 12 small dots", "the clock shows 10:45", "a cat",
            "Seventeen people stand in a row of twenty chairs", "a large purple hexagon at the top left corner"]



def write_captions(root: Path, n: int = 9) -> Path:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        Image.new("RGB", (16 + 5 * i, 40 - 2 * i), (i * 25, 90, 200 - i * 10)).save(root / "imgs" / f"{i:03d}.png")
        recs.append({"id": f"r{i}", "image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]}]})
    (root / "caps.json").write_text(json.dumps(recs))
    return root / "caps.json"


@pytest.fixture(scope="module")
def stage_models(tmp_path_factory):
    """Three tiny qwen checkpoints (seeds 0..2), saved once; tests copy them into their own runs."""
    root = tmp_path_factory.mktemp("stages")
    for s in range(3):
        FAMILIES["qwen2_5_vl"].save_tiny(root / f"s{s}", seed=s)
    return root


def make_run(root: Path, stage_models: Path, with_captions: bool = True) -> Path:
    caps = write_captions(root)
    run = root / "run"
    stages = []
    for s in range(3):
        p = f"stage-{s:02d}-{'base' if s == 0 else f'task{s}'}"
        shutil.copytree(stage_models / f"s{s}", run / p)
        stages.append({"index": s, "name": "base" if s == 0 else f"task{s}", "task": None if s == 0 else f"t{s}",
                       "path": p})
    man = {"family": "qwen2_5_vl", "recipe": "sa_proj", "base": "tiny", "tasks": ["t1", "t2"], "config": {},
           "stages": stages, "benchmarks": []}
    if with_captions:
        man["captions"] = {"path": os.path.relpath(caps, run), "images": str(root / "imgs")}
    (run / "run.json").write_text(json.dumps(man))
    return run


def test_run_json_end_to_end_table_contract(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models)
    assert main(["--ckpt-dir", str(run), "--mode", "both", "--max-new-tokens", "6", "--batch-size", "4"]) == 0
    df = pd.read_parquet(run / "probes.parquet")
    assert list(df.columns) == list(PROBES.columns)
    assert len(df) == 3 * 3 * 2 and not df.duplicated(["stage", "probe", "mode"]).any()
    assert set(df["probe"]) == {"number_mass", "number_max_prob", "entropy"}
    assert set(df["mode"]) == {"teacher-forced", "generate"}
    r = df[(df.stage == 1) & (df.probe == "number_mass") & (df["mode"] == "teacher-forced")].iloc[0]
    assert (r["run"], r["stage_name"], r["task"], r["recipe"], r["checkpoint"]) == \
        ("run", "task1", "t1", "sa_proj", "stage-01-task1")
    assert r["n_samples"] == 9 and r["dataset"] == "caps.json"

    # The row is the summary of the engine's per-sample values on that checkpoint.
    caps = load_captions(tmp_path / "caps.json", tmp_path / "imgs")
    assert r["dataset_hash"] == caps.hash
    model, proc = load(run / "stage-01-task1")
    per = Engine(model, proc).teacher_forced(caps.samples, batch_size=4)
    v = np.array([per[i]["number_mass"] for i in range(9)])
    from scipy.stats import t
    half = t.ppf(0.975, 8) * v.std(ddof=1) / 3
    assert r["mean"] == pytest.approx(v.mean(), abs=1e-12) and r["std"] == pytest.approx(v.std(ddof=1), abs=1e-12)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((v.mean() - half, v.mean() + half), abs=1e-12)
    assert r["n_positions"] == sum(per[i]["n_positions"] for i in range(9))
    g = df[(df.stage == 0) & (df["mode"] == "generate")]
    assert (g["n_positions"] <= 9 * 6).all() and (g["n_positions"] >= 9).all()
    out = capsys.readouterr().out
    assert "number_mass" in out and out.count(" done\n") == 3


def test_rerun_skips_done_work_and_a_failed_checkpoint_costs_nothing_else(tmp_path, stage_models, capsys):
    """A checkpoint without a tokenizer fails with its folder named; the others are written; after the fix,
    the rerun computes only what is missing."""
    run = make_run(tmp_path, stage_models)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for f in (run / "stage-01-task1").iterdir():
        if f.name.startswith("tokenizer"):      # the processor would load with an empty tokenizer
            shutil.move(str(f), hidden / f.name)
    assert main(["--ckpt-dir", str(run)]) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and f"stage 1 ({run / 'stage-01-task1'}) FAILED" in captured.err
    assert f"{run / 'stage-01-task1'}: no tokenizer: no tokenizer.json" in captured.err
    assert "1 checkpoint(s) failed" in captured.err
    first = pd.read_parquet(run / "probes.parquet")
    assert sorted(set(first["stage"])) == [0, 2]

    for f in hidden.iterdir():
        shutil.move(str(f), run / "stage-01-task1" / f.name)
    assert main(["--ckpt-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (already in the table)") == 2 and out.count(" done\n") == 1
    second = pd.read_parquet(run / "probes.parquet")
    assert sorted(set(second["stage"])) == [0, 1, 2] and len(second) == 9
    key = ["stage", "probe", "mode"]
    pd.testing.assert_frame_equal(second[second.stage != 1].sort_values(key).reset_index(drop=True),
                                  first.sort_values(key).reset_index(drop=True))


def test_checkpoint_with_tokenizer_but_no_processor(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models)
    for f in (run / "stage-02-task2").glob("*processor*"):
        f.unlink()
    assert main(["--ckpt-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'stage-02-task2'}: no image processor (no preprocessor_config.json" in err
    assert sorted(set(pd.read_parquet(run / "probes.parquet")["stage"])) == [0, 1]


def test_different_tokenizers_within_one_run(tmp_path, stage_models, capsys):
    from training.families.qwen2_5_vl import TINY_CORPUS, tiny_tokenizer

    run = make_run(tmp_path, stage_models)
    shutil.rmtree(run / "stage-02-task2")
    other = tiny_tokenizer(TINY_CORPUS + ["zebra giraffe elephant"], vocab_size=300)
    FAMILIES["qwen2_5_vl"].save_tiny(run / "stage-02-task2", seed=2, tokenizer=other)
    assert main(["--ckpt-dir", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run / 'stage-02-task2'}: its tokenizer" in err and f"differs from {run / 'stage-00-base'}" in err
    assert sorted(set(pd.read_parquet(run / "probes.parquet")["stage"])) == [0, 1]


def test_caption_problems_stop_before_anything_and_keep_the_table(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models)
    assert main(["--ckpt-dir", str(run), "--num-samples", "4"]) == 0
    before = (run / "probes.parquet").read_bytes()
    capsys.readouterr()
    (tmp_path / "imgs" / "002.png").unlink()
    assert main(["--ckpt-dir", str(run), "--num-samples", "5", "--strict"]) == 2   # without: skipped (test_reliability)
    assert "record 'r2': image file" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(run), "--num-samples", "50"]) == 2
    assert "asked for 50 samples but it has only 9 records" in capsys.readouterr().err
    assert (run / "probes.parquet").read_bytes() == before


def test_a_different_caption_subset_is_not_mixed_in(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models)
    assert main(["--ckpt-dir", str(run), "--num-samples", "4"]) == 0
    before = (run / "probes.parquet").read_bytes()
    assert main(["--ckpt-dir", str(run), "--num-samples", "5"]) == 1
    assert "Use --out for a separate table, or --replace" in capsys.readouterr().err
    assert (run / "probes.parquet").read_bytes() == before
    assert main(["--ckpt-dir", str(run), "--num-samples", "5", "--out", str(tmp_path / "five.parquet")]) == 0
    assert main(["--ckpt-dir", str(run), "--num-samples", "5", "--replace"]) == 0
    df = pd.read_parquet(run / "probes.parquet")
    assert set(df["n_samples"]) == {5} and len(df) == 9


def test_no_caption_set_is_a_clear_error(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models, with_captions=False)
    assert main(["--ckpt-dir", str(run)]) == 2
    assert "no caption set: pass --captions PATH" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(stage_models)]) == 2         # a plain folder of checkpoints
    assert "no caption set: pass --captions PATH" in capsys.readouterr().err
    assert main(["--ckpt-dir", str(tmp_path / "nope"), "--captions", "x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_discovery_orders_trainer_checkpoints_and_finds_adapters_and_deltas(tmp_path, stage_models, tiny_models):
    from peft import LoraConfig, get_peft_model

    root = tmp_path / "out"
    for n in (500, 1000, 20):
        shutil.copytree(stage_models / "s0", root / f"checkpoint-{n}")
    (root / "logs").mkdir()
    base, processor = tiny_models("qwen2_5_vl")
    save_full(base, processor, tmp_path / "base")
    tuned = copy.deepcopy(base)
    names = [n for n, _ in tuned.named_parameters() if "language_model" in n and ".mlp.up_proj" in n]
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n in names:
                p.mul_(-3)
    save_delta(tuned, processor, root / "z-delta", tmp_path / "base", names, FAMILIES["qwen2_5_vl"])
    loaded_base = load(tmp_path / "base")[0]
    peft = get_peft_model(loaded_base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=r".*language_model.*\.(gate_proj|down_proj)"))
    peft.save_pretrained(str(root / "y-adapter"))
    assert json.loads((root / "y-adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tmp_path / "base")
    merged = peft.merge_and_unload()

    found = discover(root)
    assert [c.stage_name for c in found.checkpoints] == ["checkpoint-20", "checkpoint-500", "checkpoint-1000",
                                                         "y-adapter", "z-delta"]
    assert [c.stage for c in found.checkpoints] == [0, 1, 2, 3, 4]

    caps = load_captions(write_captions(tmp_path), tmp_path / "imgs", 5)
    for folder, expected in (("y-adapter", merged), ("z-delta", tuned)):
        model, proc = load(root / folder)          # the adapter has no processor: its base's
        got = Engine(model, proc).teacher_forced(caps.samples, batch_size=5)
        want = Engine(expected, processor).teacher_forced(caps.samples, batch_size=5)
        for i in range(5):
            for k in ("number_mass", "entropy", "number_max_prob"):
                assert got[i][k] == pytest.approx(want[i][k], abs=1e-6), (folder, k)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(Exception, match="y-adapter.*base model"):
        load(root / "y-adapter")


def test_torchrun_two_processes_give_the_same_table_as_one(tmp_path, stage_models):
    run = make_run(tmp_path, stage_models)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    args = ["-m", "probes.run", "--ckpt-dir", str(run), "--mode", "both", "--max-new-tokens", "5",
            "--batch-size", "2"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.parquet")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--standalone", *args, "--out", str(tmp_path / "two.parquet")],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout
    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "two.parquet")
    assert len(a) == 18
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_missing_stage_folder_and_unreadable_table(tmp_path, stage_models, capsys):
    run = make_run(tmp_path, stage_models)
    shutil.rmtree(run / "stage-01-task1")
    assert main(["--ckpt-dir", str(run)]) == 1
    assert f"{run / 'stage-01-task1'}: checkpoint folder does not exist" in capsys.readouterr().err
    assert sorted(set(pd.read_parquet(run / "probes.parquet")["stage"])) == [0, 2]
    (run / "probes.parquet").write_bytes(b"not a parquet file")
    assert main(["--ckpt-dir", str(run)]) == 2
    assert f"{run / 'probes.parquet'}: cannot read the existing probe table" in capsys.readouterr().err
    assert (run / "probes.parquet").read_bytes() == b"not a parquet file"


def test_the_loading_flags_make_one_frozen_load_options():
    import argparse
    import dataclasses

    from probes.cli import add_loading_arguments, load_options
    from training.checkpoints import LoadOptions

    ap = argparse.ArgumentParser()
    add_loading_arguments(ap)
    opts = load_options(ap.parse_args(["--device", "cpu", "--attn", "eager", "--allow-pickle"]))
    assert opts == LoadOptions(dtype=torch.float32, device="cpu", attn="eager", allow_pickle=True)
    assert load_options(ap.parse_args(["--device", "cuda:1", "--trust-remote-code"])) == LoadOptions(
        dtype=torch.bfloat16, device="cuda:1", attn="sdpa", trust_remote_code=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.device = "cuda"
