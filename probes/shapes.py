"""Randomly initialised models with the real 7-8B dimensions, for GPU benchmarks without a download.

`probes/shapes/NAME.json` holds the published config's dimensions (tests/test_shapes.py pins the
parameter counts) and, under "image", the image processor's settings. The tokenizer is the family's tiny
offline one; the config's special token ids (image, video, vision start/end, BOS/EOS/PAD) are pointed at
its tokens, while the vocabulary size stays the real one, so the output projection, the per-token
statistics and the image-token counts cost what they cost on the real checkpoint.

    model, processor = build_shape("qwen2_5_vl_7b", device="cuda", dtype=torch.bfloat16)
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from training.families import get_family

SHAPES_DIR = Path(__file__).resolve().parent / "shapes"


def shape_names() -> list[str]:
    return sorted(p.stem for p in SHAPES_DIR.glob("*.json"))


def read_shape(name: str) -> dict:
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown shape {name!r}; shipped: {', '.join(shape_names())}")
    return json.loads(path.read_text())


def _family_name(model_type: str) -> str:
    from training.families import FAMILIES

    for name, fam in FAMILIES.items():
        if model_type in fam.model_types:
            return name
    raise ValueError(f"no family adapter for model_type {model_type!r}")


def shape_config(name: str, tokenizer):
    """The transformers config of a shipped shape with its special token ids pointed at `tokenizer`."""
    spec = read_shape(name)
    fam = get_family(_family_name(spec["model_type"]))
    ids = tokenizer.convert_tokens_to_ids
    kw = {k: v for k, v in spec.items() if k not in ("_source", "image", "model_type")}
    text = dict(kw.pop("text_config"))
    specials = dict(bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text.update(specials)
    if fam.name == "qwen2_5_vl":
        kw.update(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    else:
        kw["image_token_index"] = ids("<image>")
        if fam.name == "llava_onevision":
            kw["video_token_index"] = ids("<video>")
    kw.update(specials)
    import transformers

    cls = getattr(transformers, fam.model_class_name.replace("ForConditionalGeneration", "Config"))
    return cls(text_config=text, **kw)


def shape_processor(name: str, tokenizer):
    """The family's processor with the shape's image settings and the tiny tokenizer's chat template."""
    spec = read_shape(name)
    fam = _family_name(spec["model_type"])
    im = spec["image"]
    if fam == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        kw = dict(patch_size=im["patch_size"], merge_size=im["merge_size"], temporal_patch_size=2,
                  min_pixels=im["min_pixels"], max_pixels=im["max_pixels"])
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(**kw), chat_template=tokenizer.chat_template)
    s, p = im["image_size"], im["patch_size"]
    if fam == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        ip = LlavaNextImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                     image_grid_pinpoints=spec["image_grid_pinpoints"], do_pad=True)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=p,
                                  vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                                  num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    ip = LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=spec["image_grid_pinpoints"],
                                      do_pad=True)
    return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tokenizer,
                                   video_processor=LlavaOnevisionVideoProcessor(size={"height": s, "width": s}),
                                   num_image_tokens=(s // p) ** 2,
                                   vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                                   vision_aspect_ratio=spec.get("vision_aspect_ratio", "anyres_max_9"),
                                   chat_template=tokenizer.chat_template)


def build_shape(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                attn_implementation: str | None = None):
    """(randomly initialised model on `device` in `dtype`, processor). device="meta" builds no weights."""
    spec = read_shape(name)
    fam = get_family(_family_name(spec["model_type"]))
    tokenizer = importlib.import_module(f"training.families.{fam.name}").tiny_tokenizer()
    config = shape_config(name, tokenizer)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device(device):          # initialised in place, in `dtype` (transformers sets it for the init)
        model = fam.model_class._from_config(config, dtype=dtype, **kw)
    return model.eval(), shape_processor(name, tokenizer)
