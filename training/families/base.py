"""What every model family adapter knows: its transformers class, where its parts live, how to build
a tiny random model for tests, and how to load a real checkpoint from a local folder.

Part paths are dotted module paths on the loaded model. Families of the common layout need no adapter:
`training.families.discovered_family(model)` fills these paths from the module tree (discover.py). An
adapter file (an override) states them, and may reclassify layer tensors by overriding `layer_roles`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Submodule names inside one decoder layer (identical for Qwen2, Qwen2.5-VL text, Llama and Mistral).
ATTN_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
MLP_PROJ = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")

# Text every tiny test tokenizer is trained on: ordinary words, digits and number words.
TINY_CORPUS = [
    "a photo of a red square and two blue circles on a white background",
    "the image shows three green triangles next to a yellow star",
    "there are 12 small dots in the picture, about 3 of them are large",
    "a close up view of a cat sitting on a wooden table in 1999",
    "describe the image briefly. what is in the picture? how many objects are there?",
    "the clock shows 10:45 and the sign reads open from 9 to 5",
    "a large purple hexagon at the top left corner, the 1st of 4 shapes",
    "Yes. No. The answer is B. Seventeen people stand in a row of twenty chairs.",
]


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded safely; the message names the folder."""


@dataclass(frozen=True)
class Family:
    name: str                   # our name: qwen2_5_vl, llava_onevision, llava_next
    model_types: tuple[str, ...]  # config.json "model_type" values that belong to this family
    model_class_name: str       # transformers class
    vision: str                 # vision encoder module path
    projector: tuple[str, ...]  # multimodal projector module path(s)
    lm: str = "model.language_model"
    layers: str = "model.language_model.layers"
    embed: str = "model.language_model.embed_tokens"
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    image_token: str = "<image>"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> type[nn.Module]:
        import transformers
        return getattr(transformers, self.model_class_name)

    # -- parts -------------------------------------------------------------------------------------
    def num_layers(self, model: nn.Module) -> int:
        return len(model.get_submodule(self.layers))

    def layer_path(self, i: int) -> str:
        return f"{self.layers}.{i}"

    def layer_roles(self, layer: nn.Module) -> dict[str, str]:
        """Every parameter of one decoder layer (names relative to it) -> its role (discover.py); an override
        whose layers discovery misreads returns its own."""
        from .discover import layer_roles
        return layer_roles(layer)

    def collate_images(self, items: list[dict]) -> dict:
        """Batch per-example processor image outputs along the first axis. Where the examples differ on
        another axis, zero-pad it to the largest: LLaVA-NeXT's anyres tile count (pixel_values is
        (1, patches, C, H, W)), Pixtral's image height and width (the model crops by image_sizes)."""
        out = {}
        for k in items[0]:
            ts = [it[k] for it in items]
            if torch.is_tensor(ts[0]) and ts[0].dim() > 1 and len({t.shape[1:] for t in ts}) > 1:
                n = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
                ts = [F.pad(t, [x for d in reversed(range(1, t.dim())) for x in (0, n[d - 1] - t.shape[d])])
                      for t in ts]
            out[k] = torch.cat(ts, 0)
        return out

    @classmethod
    def from_discovered(cls, found, model_class_name: str, name: str | None = None) -> Family:
        """A family whose part paths are what discover.discover found in a model."""
        return cls(name=name or found.model_type, model_types=(found.model_type,), model_class_name=model_class_name,
                   vision=found.vision, projector=found.projector, lm=found.decoder, layers=found.layers,
                   embed=found.embed, final_norm=found.final_norm, lm_head=found.lm_head, image_token="",
                   notes="discovered")

    # -- building and loading ----------------------------------------------------------------------
    def build_tiny(self, seed: int = 0, **overrides):  # -> (model, processor)
        """A tiny random model (well under 5M parameters) and its offline processor."""
        raise NotImplementedError

    def save_tiny(self, path: str | os.PathLike, seed: int = 0, **overrides) -> Path:
        model, processor = self.build_tiny(seed=seed, **overrides)
        path = Path(path)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return path

    def load(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | None = None,
             attn_implementation: str | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False) -> nn.Module:
        """Load a local checkpoint folder: safetensors only by default, never the network. Pickle weights
        (allow_pickle) go through torch.load with weights_only=True, which refuses anything but tensors.
        Any failure (a truncated or corrupt file, mismatched shapes) is a CheckpointError naming the folder."""
        check_checkpoint_folder(path, allow_pickle=allow_pickle)
        kwargs: dict[str, Any] = dict(local_files_only=True, trust_remote_code=trust_remote_code,
                                      use_safetensors=not allow_pickle or has_safetensors(path), weights_only=True)
        if dtype is not None:
            kwargs["dtype"] = dtype
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = self.model_class.from_pretrained(str(path), **kwargs)
        except Exception as e:  # safetensors, pickle and shape errors come in many types; name the folder
            raise CheckpointError(f"{path}: cannot load the model weights ({type(e).__name__}: {e})") from e
        if device is not None:
            model.to(device)
        return model.eval()


def has_safetensors(path: str | os.PathLike) -> bool:
    return any(f.endswith(".safetensors") for f in os.listdir(path))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_checkpoint_folder(path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Refuse, with the folder named, anything we would not load: no folder, no config, no safetensors."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder (does not exist or is not a directory)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json, so this is not a Hugging Face checkpoint folder")
    files = os.listdir(p)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
        if pickles and not allow_pickle:
            raise CheckpointError(
                f"{p}: only pickle weights ({', '.join(pickles[:3])}); pickle can run code on load, so it is "
                "refused. Convert to safetensors, or pass --allow-pickle to load it with weights_only.")
        if not pickles:
            raise CheckpointError(f"{p}: no *.safetensors weights in the folder")


def read_model_type(path: str | os.PathLike) -> str:
    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text())["model_type"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg}: cannot read model_type ({e})") from e
