"""Load any checkpoint a run can hold, for inference: a full HF folder, a delta over its base, or a PEFT adapter.

A PEFT adapter folder (adapter_config.json + adapter_model.safetensors, as Trainer or peft saves it) names its
base in `base_model_name_or_path`; a relative name is looked up next to the adapter first, then from the
working directory. The adapter is merged into the base once, so probing it costs what a full model costs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from training.checkpoints import (  # noqa: F401  (some are re-exported for probes' users)
    ADAPTER_CONFIG,
    TOKENIZER_FILES,
    adapter_base,
    has_tokenizer,
    is_adapter,
    is_checkpoint,
    is_delta,
    load_model,
    load_processor,
    read_delta,
)
from training.families import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def has_image_processor(folder: str | os.PathLike) -> bool:
    """preprocessor_config.json (older layout) or processor_config.json with an image_processor entry."""
    p = Path(folder)
    if (p / "preprocessor_config.json").is_file():
        return True
    try:
        return "image_processor" in json.loads((p / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


def is_loadable(path: str | os.PathLike) -> bool:
    """A folder we can probe: full, delta or adapter."""
    return is_checkpoint(path) or is_adapter(path)


def load_for_inference(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | None = None,
                       attn_implementation: str | None = None, processor=None, allow_pickle: bool = False,
                       trust_remote_code: bool = False):
    """(model in eval mode, processor). Errors are CheckpointError naming the folder. Safetensors only and no
    code from the folder unless `allow_pickle` (then torch.load with weights_only) / `trust_remote_code`."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    safety = dict(allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if is_adapter(path):
        base = adapter_base(path)
        if not (path / ADAPTER_WEIGHTS).is_file() and not allow_pickle:
            raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}; pickle weights (adapter_model.bin) can run code "
                                  "on load, so they are refused unless --allow-pickle is given")
        if processor is None:
            processor = load_processor_for(path, trust_remote_code=trust_remote_code)
        model = load_model(base, dtype=dtype, attn_implementation=attn_implementation, **safety)
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False).merge_and_unload()
        except Exception as e:  # peft raises ValueError/KeyError/RuntimeError for mismatched adapters
            raise CheckpointError(f"{path}: cannot apply the adapter to its base {base} ({e})") from e
        if device is not None:
            model.to(device)
        return model.eval(), processor
    if not is_checkpoint(path):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json with weights, delta.json or "
                              f"{ADAPTER_CONFIG})")
    if processor is None:
        processor = load_processor_for(path, trust_remote_code=trust_remote_code)
    model = load_model(path, dtype=dtype, device=device, attn_implementation=attn_implementation, **safety)
    return model, processor


def load_processor_for(path: str | os.PathLike, trust_remote_code: bool = False):
    """The checkpoint's processor (tokenizer + image processor + chat template); an adapter without one uses
    its base's. Raises CheckpointError naming the folder when there is none."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    bases = [read_delta(path)[1]] if is_delta(path) else [adapter_base(path)] if is_adapter(path) else []
    source = next((c for c in [path, *bases] if has_tokenizer(c)), None)
    if source is None:
        where = f"{path}" + (f" nor its base {bases[0]}" if bases else "")
        raise CheckpointError(f"{path}: no tokenizer: no {', '.join(TOKENIZER_FILES)} or *.tiktoken in {where}; "
                              "save the processor (tokenizer included) with the checkpoint")
    if not any(has_image_processor(c) for c in [source, *bases]):
        raise CheckpointError(f"{path}: no image processor (no preprocessor_config.json, and no processor_config.json "
                              "with an image_processor entry); save the processor with the checkpoint")
    proc = load_processor(source, trust_remote_code=trust_remote_code)
    if not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
        raise CheckpointError(f"{path}: has a tokenizer but no multimodal processor (no image processor / "
                              "preprocessor_config.json); save the processor with the checkpoint")
    if not getattr(proc, "chat_template", None) and not getattr(proc.tokenizer, "chat_template", None):
        raise CheckpointError(f"{path}: its processor has no chat template; probes use the checkpoint's own")
    return proc
