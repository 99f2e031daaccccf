"""Every probes command on the unusual kinds of the tiny zoo: a one-stage training run with the drift monitor on
(training.run), then probes.run in both modes, --drift and --signatures, probes.evaluate and probes.layers, on
a hybrid linear-attention VLM (Qwen3.5), a cross-attention VLM (Mllama), an MoE VLM (Qwen3-VL-MoE), a
sandwich-norm VLM (Gemma 3) and a text-only LM (Qwen3), which probes the caption text with no image."""
import json

import pandas as pd
import pytest
from PIL import Image

import probes.evaluate
import probes.layers
import probes.run
from training.families import zoo

KINDS = [("qwen3_5", "linear_attn", "linear_attn"), ("mllama", "xattn", "xattn"), ("qwen3_vl_moe", "mlp", None),
         ("gemma3", "mlp", None), ("qwen3", "mlp_gate_up", None)]   # (zoo entry, recipe, extra layer component)
CAPTIONS = ["a red square and 2 blue circles", "there are 12 small dots", "three green triangles",
            "a cat sitting on a wooden table"]


def _write_data(root):
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(6):
        rel = f"{i}.png"
        Image.new("RGB", (32 + 8 * i, 32), (40 * i, 90, 200 - 30 * i)).save(root / "images" / rel)
        records.append({"id": f"r{i}", "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nHow many people are there?"},
            {"from": "gpt", "value": "Seventeen people" if i % 2 else "Seventeen"}]})
    (root / "tasks" / "a").mkdir(parents=True)
    for split in ("train", "test"):
        (root / "tasks" / "a" / f"{split}.json").write_text(json.dumps(records))
    caps = [{"id": f"c{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(CAPTIONS)]
    (root / "captions.json").write_text(json.dumps(caps))


def _train(name, recipe, tmp_path):
    from training.config import load_config
    from training.run import run

    base, root = tmp_path / "base", tmp_path / "data"
    model, processor = zoo.build(name)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    _write_data(root)
    cfg = load_config("toy-tiny", ["train.progress=false", f"base={base}", f"data.root={root}", "tasks=[a]",
                                   "train.max_steps=2", "train.batch_size=2", "train.warmup_ratio=0",
                                   "data.max_examples=4", "monitor.every=1", "monitor.captions=3",
                                   "monitor.batch_size=2", f"probe.captions={root / 'captions.json'}",
                                   f"probe.images={root / 'images'}"])
    cfg["recipe"], cfg["out"] = recipe, str(tmp_path / "run")
    return run(cfg, "toy-tiny"), root


@pytest.mark.parametrize("name,recipe,extra", KINDS)
def test_every_probes_command_on_each_kind(name, recipe, extra, tmp_path):
    out, root = _train(name, recipe, tmp_path)
    R = str(out)
    monitor = pd.read_parquet(out / "monitor.parquet")
    assert {"number_mass", "kl_to_base"} <= set(monitor["probe"])

    assert probes.run.main(["--ckpt-dir", R, "--mode", "both", "--drift", "--signatures", "--batch-size", "2",
                            "--max-new-tokens", "3"]) == 0
    df = pd.read_parquet(out / "probes.parquet")
    tf = df[df["mode"] == "teacher-forced"].set_index(["stage", "probe"])["mean"]
    assert tf[(0, "kl_to_base")] == 0 and tf[(1, "kl_to_base")] > 0 and tf[(0, "top1_agreement")] == 1
    assert any(p.startswith("sig_a") for p in df["probe"]) and "generate" in set(df["mode"])

    assert probes.evaluate.main(["--ckpt-dir", R, "--benchmark-file", f"a={root / 'tasks/a/test.json'}",
                                 "--images", str(root / "images"), "--scorer", "exact", "--batch-size", "3",
                                 "--max-new-tokens", "3"]) == 0
    assert len(pd.read_parquet(out / "evals.parquet")) == 2

    assert probes.layers.main(["--ckpt-dir", R, "--batch-size", "2"]) == 0
    layers = pd.read_parquet(out / "layers.parquet")
    assert {"attn", "mlp"} | ({extra} if extra else set()) == set(layers["component"])
    moved = layers[(layers["stage"] == 1) & (layers["measure"] == "logit_l2")]
    assert (layers[layers["stage"] == 0]["mean"] == 0).all() and (moved["mean"] > 0).any()


def test_a_text_only_checkpoint_folder_probes_caption_text_without_images(tmp_path):
    """--ckpt-dir a single text-only checkpoint; the caption records name images that are not there."""
    model, tok = zoo.build("llama")
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    caps = [{"id": f"c{i}", "image": f"missing/{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(CAPTIONS)]
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    assert probes.run.main(["--ckpt-dir", str(tmp_path / "llama"), "--captions", str(tmp_path / "caps.json"),
                            "--mode", "both", "--batch-size", "3", "--max-new-tokens", "3", "--strict"]) == 0
    df = pd.read_parquet(tmp_path / "llama" / "probes.parquet")
    assert set(df["mode"]) == {"teacher-forced", "generate"} and (df["n_samples"] == len(CAPTIONS)).all()
