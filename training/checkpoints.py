"""Checkpoint folders: write them atomically (full or delta), and the one loader of every stage folder
(full, delta, PEFT adapter, MoE baseline) with the one set of load settings, `LoadOptions`.

A full checkpoint is a Hugging Face `save_pretrained` folder (config.json, *.safetensors, processor and
tokenizer files). A delta holds only the trained tensors, for real models where a full save per stage per
recipe fills a disk:

    stage-03-textvqa/delta.json          {"format": "lmm-drift-delta", "version": 1, "base": "../../Qwen2.5-VL-7B",
                                          "family": "qwen2_5_vl", "tensors": 112}
    stage-03-textvqa/delta.safetensors   the trained tensors' full values (not differences), by parameter name
    stage-03-textvqa/tokenizer*.json ... processor files, so the folder is self-describing

`base` is a full checkpoint folder, relative to the delta folder or absolute; deltas never chain.
Writers go through a temporary sibling folder and rename, so a half-written folder is never taken as done.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import moe_layer
from .families import (
    FAMILIES,
    CheckpointError,
    Family,
    check_checkpoint_folder,
    family_of_checkpoint,
    is_image_text,
)
from .families.base import read_model_type

DELTA_JSON = "delta.json"
DELTA_WEIGHTS = "delta.safetensors"
DELTA_FORMAT = "lmm-drift-delta"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Files that hold a vocabulary; without one, AutoProcessor quietly builds an empty tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return any((p / f).is_file() for f in TOKENIZER_FILES) or any(p.glob("*.tiktoken"))


def is_delta(path: str | os.PathLike) -> bool:
    return (Path(path) / DELTA_JSON).is_file()


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A folder that looks like a checkpoint we can load (full HF folder or delta); not validated deeply."""
    p = Path(path)
    return p.is_dir() and (is_delta(p) or (p / "config.json").is_file() and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(p)))


class _AtomicDir:
    """Write into a temporary sibling, rename onto `path` on success; remove the temporary on failure."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return False


def atomic_dir(path: str | os.PathLike) -> _AtomicDir:
    return _AtomicDir(path)


def save_full(model: nn.Module, processor, path: str | os.PathLike, state_dict: dict | None = None,
              extra: Callable[[Path], None] | None = None) -> Path:
    """`state_dict`: the full weights where the model's own are sharded (FSDP, ZeRO-3), gathered by the caller.
    `extra(folder)` writes more files into the folder before it is renamed into place (e.g. moe.json)."""
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if processor is not None:
            processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return Path(path)


def save_delta(model: nn.Module, processor, path: str | os.PathLike, base: str | os.PathLike,
               names: Iterable[str], family: Family, state_dict: dict | None = None,
               extra: Callable[[Path], None] | None = None) -> Path:
    """Save only `names` (parameter names) of `model` (or of `state_dict`, the gathered full weights of a
    sharded model), naming `base` (a full checkpoint folder). No names: a delta equal to its base."""
    path, base = Path(path), Path(base)
    params = state_dict if state_dict is not None else dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"save_delta: no parameter named {missing[0]!r}")
    tensors = {n: params[n].detach().to("cpu").contiguous().clone() for n in names}
    rel = os.path.relpath(base.resolve(), path.parent.resolve() / path.name)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / DELTA_WEIGHTS), metadata={"format": DELTA_FORMAT})
        (tmp / DELTA_JSON).write_text(json.dumps({"format": DELTA_FORMAT, "version": 1, "base": rel,
                                                  "family": family.name, "tensors": len(tensors)}, indent=1))
        if processor is not None:
            processor.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
    return path


def read_delta(path: str | os.PathLike) -> tuple[dict, Path]:
    """(delta.json contents, resolved base folder); errors name the folder."""
    p = Path(path)
    try:
        meta = json.loads((p / DELTA_JSON).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / DELTA_JSON}: unreadable delta description ({e})") from e
    if meta.get("format") != DELTA_FORMAT or "base" not in meta:
        raise CheckpointError(f"{p / DELTA_JSON}: not an {DELTA_FORMAT} file (needs format and base)")
    base = Path(meta["base"])
    base = base if base.is_absolute() else (p / base)
    base = Path(os.path.normpath(base))
    if not base.is_dir():
        raise CheckpointError(f"{p}: its base checkpoint {base} does not exist")
    if is_delta(base):
        raise CheckpointError(f"{p}: its base {base} is itself a delta; deltas must name a full checkpoint")
    return meta, base


def family_of(path: str | os.PathLike) -> Family:
    if is_delta(path):
        meta, base = read_delta(path)
        # an override by its name; a discovered family (named by its model type) is read from the base
        return FAMILIES[meta["family"]] if meta.get("family") in FAMILIES else family_of_checkpoint(base)
    return family_of_checkpoint(path)


def is_adapter(path: str | os.PathLike) -> bool:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a LoRA run's stage."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_stage(path: str | os.PathLike) -> bool:
    """What a run's stage folder may be: a full folder, a delta or a PEFT adapter."""
    return is_checkpoint(path) or is_adapter(path)


def adapter_base(path: str | os.PathLike) -> Path:
    """The checkpoint folder a PEFT adapter's `base_model_name_or_path` names; a relative name is looked up
    next to the adapter first, then beside it, then from the working directory."""
    p = Path(path)
    try:
        name = json.loads((p / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p / ADAPTER_CONFIG}: cannot read base_model_name_or_path ({e})") from e
    if not name:
        raise CheckpointError(f"{p / ADAPTER_CONFIG}: base_model_name_or_path is empty")
    for cand in ([Path(name)] if Path(name).is_absolute() else [p / name, p.parent / name, Path(name)]):
        if is_checkpoint(cand):
            return Path(os.path.normpath(cand))
    raise CheckpointError(f"{p}: its base model {name!r} (adapter_config.json) is not a local checkpoint folder; "
                          "copy the base next to the adapter or write its local path into adapter_config.json")


@dataclass(frozen=True)
class LoadOptions:
    """The one place the load settings live. dtype/device/attn: None keeps the folder's dtype, the CPU and
    the library's default attention. Safetensors only and no code from the folder unless `allow_pickle`
    (then torch.load with weights_only) / `trust_remote_code`."""
    dtype: torch.dtype | None = None
    device: str | None = None
    attn: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False


def load(path: str | os.PathLike, opts: LoadOptions = LoadOptions(), *, processor=None):
    """(model in eval mode, processor) of any folder a run's stage may be: a full folder, a delta over its
    base, or a PEFT adapter (merged into its base once, so it costs what a full model costs); the MoE
    baseline's layers are rebuilt. `processor`: one already loaded (it is not loaded again). Errors are
    CheckpointError naming the folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    if not is_stage(path):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json with weights, delta.json or "
                              f"{ADAPTER_CONFIG})")
    if processor is None:
        processor = load_processor(path, opts)
    return load_model(path, opts), processor


def load_model(path: str | os.PathLike, opts: LoadOptions = LoadOptions()) -> nn.Module:
    """The model alone, in eval mode (see `load`)."""
    path = Path(path)
    if is_adapter(path):
        return _load_adapter(path, opts)
    kw = dict(dtype=opts.dtype, attn_implementation=opts.attn, allow_pickle=opts.allow_pickle,
              trust_remote_code=opts.trust_remote_code)
    if not is_delta(path):
        model = family_of_checkpoint(path).load(path, **kw)
        return _finish(model, path, opts.device)
    meta, base = read_delta(path)
    model = family_of_checkpoint(base).load(base, **kw)
    weights = path / DELTA_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path}: no {DELTA_WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{weights}: cannot read ({e})") from e
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for n, t in tensors.items():
            if n not in params:
                raise CheckpointError(f"{weights}: tensor {n!r} is not a parameter of the base model {base}")
            if params[n].shape != t.shape:
                raise CheckpointError(f"{weights}: tensor {n!r} has shape {tuple(t.shape)}, the base has "
                                      f"{tuple(params[n].shape)}")
            params[n].copy_(t.to(params[n].dtype))
    return _finish(model, path, opts.device)


def _load_adapter(path: Path, opts: LoadOptions) -> nn.Module:
    """The adapter merged into its base (loaded on the CPU, moved once merged)."""
    base = adapter_base(path)
    if not (path / ADAPTER_WEIGHTS).is_file() and not opts.allow_pickle:
        raise CheckpointError(f"{path}: no {ADAPTER_WEIGHTS}; pickle weights (adapter_model.bin) can run code "
                              "on load, so they are refused unless --allow-pickle is given")
    model = load_model(base, replace(opts, device=None))
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False).merge_and_unload()
    except Exception as e:  # peft raises ValueError/KeyError/RuntimeError for mismatched adapters
        raise CheckpointError(f"{path}: cannot apply the adapter to its base {base} ({e})") from e
    if opts.device is not None:
        model.to(opts.device)
    return model.eval()


def _finish(model: nn.Module, path: Path, device: str | None) -> nn.Module:
    if moe_layer.is_moe_folder(path):
        moe_layer.restore(model, path)
    if device is not None:
        model.to(device)
    return model.eval()


def has_image_processor(folder: str | os.PathLike) -> bool:
    """preprocessor_config.json (older layout) or processor_config.json with an image_processor entry."""
    p = Path(folder)
    if (p / "preprocessor_config.json").is_file():
        return True
    try:
        return "image_processor" in json.loads((p / "processor_config.json").read_text())
    except (OSError, ValueError):
        return False


def _text_only(path: Path, bases: list) -> bool:
    """A checkpoint of a text-only LM (its config's model_type is not an image-text one)."""
    folder = next((c for c in [path, *bases] if (Path(c) / "config.json").is_file()), None)
    return folder is not None and not is_image_text(read_model_type(folder))


def load_processor(path: str | os.PathLike, opts: LoadOptions = LoadOptions()):
    """The checkpoint's processor (tokenizer + image processor + chat template): the folder's own, else a
    delta's or an adapter's base's. Raises CheckpointError naming the folder when there is none."""
    from transformers import AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder does not exist")
    bases = [read_delta(path)[1]] if is_delta(path) else [adapter_base(path)] if is_adapter(path) else []
    sources = [c for c in [path, *bases] if has_tokenizer(c)]
    if not sources:
        where = f"{path}" + (f" nor its base {bases[0]}" if bases else "")
        raise CheckpointError(f"{path}: no tokenizer: no {', '.join(TOKENIZER_FILES)} or *.tiktoken in {where}; "
                              "save the processor (tokenizer included) with the checkpoint")
    text_only = _text_only(path, bases)
    if not text_only and not any(has_image_processor(c) for c in [sources[0], *bases]):
        raise CheckpointError(f"{path}: no image processor (no preprocessor_config.json, and no processor_config.json "
                              "with an image_processor entry); save the processor with the checkpoint")
    errors = []
    for c in sources:
        try:
            proc = AutoProcessor.from_pretrained(str(c), local_files_only=True,
                                                 trust_remote_code=opts.trust_remote_code)
            break
        except (OSError, ValueError, TypeError) as e:
            errors.append(f"{c}: {e}")
    else:
        raise CheckpointError(f"{path}: no usable processor/tokenizer ({'; '.join(errors)[:400]})")
    if text_only:  # a text-only LM's processor is its tokenizer
        proc = getattr(proc, "tokenizer", proc)
        if not getattr(proc, "chat_template", None):
            raise CheckpointError(f"{path}: its tokenizer has no chat template; probes use the checkpoint's own")
        return proc
    if not hasattr(proc, "tokenizer") or not hasattr(proc, "image_processor"):
        raise CheckpointError(f"{path}: has a tokenizer but no multimodal processor (no image processor / "
                              "preprocessor_config.json); save the processor with the checkpoint")
    if not getattr(proc, "chat_template", None) and not getattr(proc.tokenizer, "chat_template", None):
        raise CheckpointError(f"{path}: its processor has no chat template; probes use the checkpoint's own")
    return proc


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DELTA_JSON", "DELTA_WEIGHTS", "TOKENIZER_FILES", "LoadOptions",
           "adapter_base", "atomic_dir", "check_checkpoint_folder", "family_of", "has_image_processor",
           "has_tokenizer", "is_adapter", "is_checkpoint", "is_delta", "is_stage", "load", "load_model",
           "load_processor", "read_delta", "save_delta", "save_full"]
