"""Model family adapters: one small file each, registered by name.

    family = get_family("qwen2_5_vl")          # by our name
    family = family_of_checkpoint("/ckpt/dir")  # from config.json's model_type
"""
from __future__ import annotations

import os

from .base import CheckpointError, Family, check_checkpoint_folder, read_model_type
from .llava_next import FAMILY as LLAVA_NEXT
from .llava_onevision import FAMILY as LLAVA_ONEVISION
from .qwen2_5_vl import FAMILY as QWEN2_5_VL

FAMILIES: dict[str, Family] = {f.name: f for f in (QWEN2_5_VL, LLAVA_ONEVISION, LLAVA_NEXT)}

__all__ = ["FAMILIES", "CheckpointError", "Family", "check_checkpoint_folder", "family_of_checkpoint",
           "family_of_model", "get_family"]


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; valid families: {', '.join(FAMILIES)}") from None


def family_of_model_type(model_type: str, where: str = "") -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise CheckpointError(f"{where or 'model'}: model_type {model_type!r} is not a supported family "
                          f"(supported model_type values: {', '.join(known)})")


def family_of_checkpoint(path: str | os.PathLike) -> Family:
    return family_of_model_type(read_model_type(path), str(path))


def family_of_model(model) -> Family:
    return family_of_model_type(model.config.model_type)
