"""Image features shared by the checkpoints of a run whose vision encoder and projector are bitwise equal.

LM-only recipes (sa_proj, mlp, llm, ...) never change the vision side, so every stage of such a run maps
an image to the same features. The engine computes a fingerprint of the vision encoder + projector
tensors (sha256 over names, dtypes, shapes and bytes, plus the vision-side config, dtype, device and
attention implementation); features computed under one fingerprint are reused by any later checkpoint
with the same fingerprint, so a `vision`, `projector` or `full` stage (new fingerprint) recomputes them.
Entries hold one batch's images (the stages of a run probe the same caption plan, so they hit), which
keeps the features bitwise those of the model's own forward on that batch.

Features are the model's own `get_image_features` outputs (one tensor per image: after the projector,
with LLaVA's row separators), placed into the input embeddings exactly as the model's forward does.
The store is bounded by bytes; beyond it, features are simply recomputed.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

DEFAULT_MAX_BYTES = 4 << 30
# Config keys that never change what the vision side computes (paths, versions, bookkeeping).
_IGNORED_CONFIG = {"text_config", "transformers_version", "architectures", "dtype", "torch_dtype",
                   "name_or_path", "output_attentions", "output_hidden_states", "return_dict"}


def _in_parts(name: str, parts: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parts)


def vision_fingerprint(model: nn.Module, family) -> str:
    """sha256 of everything that decides an image's features: the vision encoder and projector tensors
    (as the family adapter locates them), the non-text config, dtype, device type and attention kernel."""
    parts = (family.vision, *family.projector)
    h = hashlib.sha256()
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if _in_parts(n, parts)]
    if not tensors:
        raise ValueError(f"{type(model).__name__}: no tensors under {parts}; the family adapter does not "
                         "match this model")
    for name, t in sorted(tensors, key=lambda x: x[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _IGNORED_CONFIG and not k.startswith("_")}
    attn = getattr(model.config, "_attn_implementation", None)
    vis = getattr(model.config, "vision_config", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(f"{attn}|{getattr(vis, '_attn_implementation', None)}|{tensors[0][1].device.type}".encode())
    return h.hexdigest()[:32]


class VisionCache:
    """{(vision fingerprint, processor key, the batch's (sample id, image ref) in order): the batch's image
    features}, bounded by bytes.

    Features are kept on `device` (the CPU by default, so GPU memory stays for batches; they are moved to
    the model's device per batch). Counters record hits and misses for the benchmark.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, device: str | torch.device = "cpu"):
        self.max_bytes, self.bytes, self.device = max_bytes, 0, torch.device(device)
        self.store: dict[tuple, torch.Tensor] = {}
        self.hits = self.misses = 0

    def get(self, key) -> torch.Tensor | None:
        return self.store.get(key)

    def put(self, key, features: torch.Tensor) -> None:
        if key in self.store:
            return
        size = features.nbytes
        if self.bytes + size <= self.max_bytes:
            t = features.detach().to(self.device, copy=True)
            if self.device.type == "cpu" and features.is_cuda:
                t = t.pin_memory()
            self.store[key] = t
            self.bytes += size

    def clear(self) -> None:
        self.store.clear()
        self.bytes = 0
