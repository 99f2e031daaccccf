"""The MoE baseline's layer: a two-expert MLP in every LM decoder layer, and its files beside a checkpoint.

    router(x) = W x + b            (token-level, hidden -> 2, initialised to zero)
    training:   y = p0 * E0(x) + p1 * E1(x),  p = softmax(router(x))     (top-2 soft mixing)
    evaluation: y = E_argmax(x)                                          (top-1: the chosen expert's output,
                                                                          unweighted; ties go to E0)

On disk a stage folder is an ordinary checkpoint of the model with its original MLPs (full or delta, so
the Auto classes load the un-converted model) plus
    moe.json          {"format": "lmm-drift-moe", "version": 1, "experts": 2, "layers": N, ...}
    moe.safetensors   the copies and routers, by parameter name (…layers.I.mlp.experts.1.*, …mlp.router.*)
`training.checkpoints.load` rebuilds the MoE from them (`restore`); the training method that writes them
is training.methods.moe. This module depends only on torch and training.families, so the loader can use it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .families import CheckpointError, family_of_model

MOE_JSON = "moe.json"
MOE_WEIGHTS = "moe.safetensors"
MOE_FORMAT = "lmm-drift-moe"


class TwoExpertMLP(nn.Module):
    """experts[0]: the original MLP (frozen); experts[1]: a copy; router: Linear(hidden, 2), zero-initialised."""

    def __init__(self, original: nn.Module, hidden_size: int):
        super().__init__()
        self.experts = nn.ModuleList([original, copy.deepcopy(original)])
        w = next(original.parameters())
        self.router = nn.Linear(hidden_size, 2, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        original.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        if self.training:
            p = logits.float().softmax(-1)
            return p[..., :1] * self.experts[0](x) + p[..., 1:] * self.experts[1](x)
        choice = logits.argmax(-1)
        if not choice.any():
            return self.experts[0](x)
        if choice.all():
            return self.experts[1](x)
        out = None
        for e in (0, 1):
            sel = choice == e
            y = self.experts[e](x[sel])
            out = y.new_empty(*x.shape[:-1], y.shape[-1]) if out is None else out
            out[sel] = y
        return out


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family_of_model(model).layers)


def convert(model: nn.Module) -> int:
    """Give every LM decoder layer a TwoExpertMLP (in place); returns the number of layers."""
    layers = decoder_layers(model)
    for layer in layers:
        if not isinstance(layer.mlp, TwoExpertMLP):
            layer.mlp = TwoExpertMLP(layer.mlp, layer.mlp.down_proj.out_features)
    return len(layers)


def is_moe(model: nn.Module) -> bool:
    return any(isinstance(m, TwoExpertMLP) for m in model.modules())


@contextlib.contextmanager
def dense_view(model: nn.Module):
    """Within the block, each layer's MLP is its original expert again (to save or plan on plain names)."""
    swapped = [(layer, layer.mlp) for layer in decoder_layers(model) if isinstance(layer.mlp, TwoExpertMLP)]
    for layer, moe in swapped:
        layer.mlp = moe.experts[0]
    try:
        yield model
    finally:
        for layer, moe in swapped:
            layer.mlp = moe


def moe_tensors_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".mlp.experts.1." in n or ".mlp.router." in n]


def moe_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The copies' and routers' tensors by parameter name (what moe.safetensors holds)."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters()
            if ".mlp.experts.1." in n or ".mlp.router." in n}


def write_moe(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], n_layers: int) -> None:
    folder = Path(folder)
    save_file(tensors, str(folder / MOE_WEIGHTS), metadata={"format": MOE_FORMAT})
    (folder / MOE_JSON).write_text(json.dumps({
        "format": MOE_FORMAT, "version": 1, "experts": 2, "layers": n_layers, "router": "linear hidden->2",
        "train": "top-2 softmax mix", "eval": "top-1 (the chosen expert's output, unweighted)",
        "tensors": len(tensors)}, indent=1))


def is_moe_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / MOE_JSON).is_file()


def restore(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Convert `model` (loaded from the folder's ordinary checkpoint) and load the copies and routers."""
    path = Path(path)
    try:
        meta = json.loads((path / MOE_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / MOE_JSON}: unreadable ({e})") from e
    if meta.get("format") != MOE_FORMAT or meta.get("experts") != 2:
        raise CheckpointError(f"{path / MOE_JSON}: not a two-expert {MOE_FORMAT} description")
    n = convert(model)
    if meta.get("layers") != n:
        raise CheckpointError(f"{path / MOE_JSON}: {meta.get('layers')} MoE layers, the model has {n}")
    try:
        tensors = load_file(str(path / MOE_WEIGHTS))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path / MOE_WEIGHTS}: cannot read ({e})") from e
    params = dict(model.named_parameters())
    wanted = set(moe_tensors_names(model))
    if set(tensors) != wanted:
        odd = sorted(set(tensors) ^ wanted)
        raise CheckpointError(f"{path / MOE_WEIGHTS}: tensors do not match the model's MoE parameters (e.g. {odd[0]})")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise CheckpointError(f"{path / MOE_WEIGHTS}: {name} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(params[name].shape)}")
            params[name].copy_(t.to(params[name].dtype))
    return model
