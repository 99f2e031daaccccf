"""The shipped 7-8B shapes build (on the meta device: no memory) with the published parameter counts."""
import json
from pathlib import Path

import pytest
import torch
from transformers import LlavaNextConfig, LlavaOnevisionConfig, Qwen2_5_VLConfig

from training.families import get_family

SHAPES = Path(__file__).resolve().parents[1] / "probes" / "shapes"
# Published totals: Qwen2.5-VL-7B-Instruct 8.29B, llava-onevision-qwen2-7b-ov 8.03B, llama3-llava-next-8b 8.36B.
CASES = [("qwen2_5_vl_7b", Qwen2_5_VLConfig, "qwen2_5_vl", 8.29e9),
         ("llava_onevision_7b", LlavaOnevisionConfig, "llava_onevision", 8.03e9),
         ("llava_next_8b", LlavaNextConfig, "llava_next", 8.36e9)]


@pytest.mark.parametrize("shape,config_cls,family,published", CASES)
def test_shape_matches_published_size(shape, config_cls, family, published):
    spec = json.loads((SHAPES / f"{shape}.json").read_text())
    assert spec["model_type"] == get_family(family).model_types[0]
    cfg = config_cls(**{k: v for k, v in spec.items() if k not in ("_source", "image", "model_type")})
    with torch.device("meta"):
        model = get_family(family).model_class._from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.005, n
