"""Command-line options every probe command shares: where to run, and what loading may do."""
from __future__ import annotations

import argparse
import os

import torch

from training.checkpoints import LoadOptions

ATTN_CHOICES = ["auto", "sdpa", "flash_attention_2", "eager"]


def add_loading_arguments(ap: argparse.ArgumentParser, records: str = "record") -> None:
    """--device, --attn, --strict, --allow-pickle, --trust-remote-code (docs/reliability.md)."""
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    ap.add_argument("--attn", default="auto", choices=ATTN_CHOICES,
                    help="attention implementation on a GPU (auto: sdpa)")
    ap.add_argument("--strict", action="store_true",
                    help=f"stop on any bad {records} (default: skip it, count it, and report the first)")
    ap.add_argument("--allow-pickle", action="store_true",
                    help="load pickle weights (*.bin) when a folder has no safetensors, with "
                         "torch.load(weights_only=True); refused by default because pickle can run code")
    ap.add_argument("--trust-remote-code", action="store_true",
                    help="let a checkpoint's own Python code (config auto_map) run; off by default")


def pick_device(arg: str = "auto", attn: str = "auto") -> tuple[str, torch.dtype, str | None]:
    """(device, dtype, attention implementation): fp32 on the CPU, bf16 + SDPA (or flash) on a GPU."""
    if arg == "auto":
        arg = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda"):
        return arg, torch.bfloat16, "sdpa" if attn == "auto" else attn
    return arg, torch.float32, None if attn == "auto" else attn


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The LoadOptions of `add_loading_arguments`' flags (device, dtype and attention from `pick_device`)."""
    device, dtype, attn = pick_device(args.device, args.attn)
    return LoadOptions(dtype=dtype, device=device, attn=attn, allow_pickle=args.allow_pickle,
                       trust_remote_code=args.trust_remote_code)
