"""Command-line options every probe command shares: where to run, and what loading may do."""
from __future__ import annotations

import argparse

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
