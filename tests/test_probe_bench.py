"""`python -m probes.bench`: the smoke run prints the ratios last; the 7-8B shapes build without weights."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from probes.bench import main
from probes.shapes import build_shape, read_shape, shape_names
from training.chat import encode

REPO = Path(__file__).resolve().parents[1]
RATIO_LINES = [r"speedup teacher-forced engine vs naive per-sample: \d+\.\dx",
               r"speedup teacher-forced engine vs study probe: \d+\.\dx",
               r"speedup generation engine vs study probe: \d+\.\dx"]


def test_quick_bench_runs_and_ends_with_the_three_ratios(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--num-captions", "6", "--study-captions", "3", "--max-new-tokens", "3",
                   "--batch-size", "4", "--json", str(tmp_path / "bench.json")])
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    for line, pattern in zip(lines[-3:], RATIO_LINES):
        assert re.fullmatch(pattern, line), line
    table = {ln.split("  ")[0]: ln for ln in lines if ln.startswith("(")}
    assert len(table) == 4 and all(re.search(r"pairs|\d", v) for v in table.values())
    agreement = next(ln for ln in lines if ln.startswith("agreement:"))
    assert "3/3 identical token sequences" in agreement          # the engines compute what the baselines do
    cache = next(ln for ln in lines if ln.startswith("cache:"))
    assert "6 image features and 6 encodings reused" in cache and "max |diff| 0.0e+00" in cache
    doc = json.loads((tmp_path / "bench.json").read_text())          # the same figures, as JSON
    assert list(doc["methods"]) == ["study", "naive", "tf_engine", "gen_engine"]
    assert doc["methods"]["tf_engine"]["captions"] == 6 and doc["methods"]["study"]["captions"] == 3
    assert f"{doc['ratios']['gen_vs_study']:.1f}x" in lines[-1]
    assert doc["agreement"]["gen_identical"] == 3 and doc["cache"]["image_features_reused"] == 6
    assert doc["methods"]["tf_engine"]["mfu"] is None and doc["device"] == "cpu"     # MFU: GPUs only


def test_a_shape_on_a_machine_without_gpu_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "probes.bench", "--shape", "qwen2_5_vl_7b"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a GPU" in r.stderr


@pytest.mark.parametrize("name", shape_names())
def test_shapes_build_with_real_sizes_and_the_tiny_tokenizers_special_tokens(name):
    spec = read_shape(name)
    model, processor = build_shape(name, device="meta")
    tok = processor.tokenizer
    cfg = model.config
    assert model.get_output_embeddings().weight.shape[0] == spec["text_config"]["vocab_size"] > 100 * len(tok)
    image_token = "<|image_pad|>" if spec["model_type"] == "qwen2_5_vl" else "<image>"
    assert tok.convert_ids_to_tokens(cfg.image_token_id) == image_token
    assert cfg.get_text_config().eos_token_id == tok.eos_token_id
    im = spec["image"]
    size = processor.image_processor.size
    if "max_pixels" in im:          # Qwen2-VL keeps min/max pixels as shortest/longest edge
        assert (size["shortest_edge"], size["longest_edge"]) == (im["min_pixels"], im["max_pixels"])
    else:
        crop = getattr(processor.image_processor, "crop_size", None) or size
        assert crop["height"] == im["image_size"]
    ex = encode(processor, Image.new("RGB", (500, 375)), "Describe the image.", "a cat")
    n_image = int((ex.input_ids == cfg.image_token_id).sum())
    assert n_image > 100                           # a real image's worth of tokens, not a tiny model's
