"""Model families: part paths discovered from any model's module tree (discover.py), or stated by an
override (one small file each, registered here by name) where discovery cannot read a model type.

    family = get_family("qwen2_5_vl")          # an override by our name, or a model type of the tiny zoo
    family = family_of_checkpoint("/ckpt/dir")  # from config.json's model_type: override, else discovered
    family = family_of_model(model)             # override, else discovered from the model itself
"""
from __future__ import annotations

import os
import weakref

from torch import nn

from .base import CheckpointError, Family, check_checkpoint_folder, read_model_type
from .discover import DiscoveryError, discover
from .llava_next import FAMILY as LLAVA_NEXT
from .llava_onevision import FAMILY as LLAVA_ONEVISION
from .qwen2_5_vl import FAMILY as QWEN2_5_VL

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_5_VL, LLAVA_ONEVISION, LLAVA_NEXT)}

__all__ = ["FAMILIES", "CheckpointError", "DiscoveryError", "Family", "check_checkpoint_folder",
           "discovered_family", "family_of_checkpoint", "family_of_model", "get_family", "is_image_text"]


def get_family(name: str) -> Family:
    """An override by our name, else a model type of the tiny zoo (its family discovered from its tiny model)."""
    if name in FAMILIES:
        return FAMILIES[name]
    from . import zoo
    if name in zoo.TINY:
        return zoo.family(name)
    raise ValueError(f"unknown family {name!r}; valid families: {', '.join(FAMILIES)}, and the tiny zoo's "
                     f"model types: {', '.join(zoo.TINY)}")


def override_of_model_type(model_type: str) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


_DISCOVERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def discovered_family(model: nn.Module) -> Family:
    """A Family whose part paths come from the model's own module tree (training/families/discover.py);
    remembered per model object, as probes ask for it often."""
    if model not in _DISCOVERED:
        _DISCOVERED[model] = Family.from_discovered(discover(model), type(model).__name__)
    return _DISCOVERED[model]


def family_of_checkpoint(path: str | os.PathLike) -> Family:
    model_type = read_model_type(path)
    fam = override_of_model_type(model_type)
    if fam is not None:
        return fam
    try:
        return discovered_family(skeleton(path))
    except (DiscoveryError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not an overridden family and discovery "
                              f"cannot read it: {e}") from e


def family_of_model(model) -> Family:
    return override_of_model_type(model.config.model_type) or discovered_family(model)


def is_image_text(model_type: str) -> bool:
    """Whether transformers loads this model type with AutoModelForImageTextToText (else: a text-only LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or override_of_model_type(model_type) is not None


def auto_class(config):
    """AutoModelForImageTextToText for an image-text config, else AutoModelForCausalLM."""
    import transformers

    if is_image_text(config.model_type):
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def skeleton(path: str | os.PathLike) -> nn.Module:
    """A checkpoint folder's architecture (from config.json) on the meta device: names and shapes, no weights."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    fam = override_of_model_type(config.model_type)
    with torch.device("meta"):
        if fam is not None:
            return fam.model_class._from_config(config)
        return auto_class(config).from_config(config)
