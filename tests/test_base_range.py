"""The world's toy base model, built by the shipped plan on this machine, scores within the range docs/world.md
documents (training/world/base_range.yaml, measured over three seeds by scripts/base_seeds.py). The base is
built once into the default cache (`.cache/`, or $LMM_DRIFT_CACHE), which `make demo` then reuses: on a
fresh clone this test is the machine-to-machine check that the demo's numbers will be docs/demo.md's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.world.base import BASE_JSON, documented_range, out_of_range
from training.world.registry import HELDOUT_TASKS

ROOT = Path(__file__).resolve().parents[1]


def test_an_ability_outside_its_range_is_named():
    rng = documented_range("qwen2_5_vl", "toy")
    assert set(HELDOUT_TASKS) <= set(rng) and all(0 <= lo <= hi <= 100 for lo, hi in rng.values())
    inside = {task: {"accuracy": (lo + hi) / 2} for task, (lo, hi) in rng.items()}
    assert out_of_range(inside, "qwen2_5_vl", "toy") == []
    low, high = rng["colour"]
    outside = inside | {"colour": {"accuracy": low - 0.5}}
    assert out_of_range(outside, "qwen2_5_vl", "toy") == [f"colour {low - 0.5} (documented {low:g}-{high:g})"]
    assert out_of_range({}, "qwen2_5_vl", "toy")[0].startswith(f"{next(iter(rng))} None")
    assert documented_range("qwen2_5_vl", "tiny") == {} and out_of_range({}, "qwen2_5_vl", "tiny") == []


def test_the_documented_range_is_the_one_docs_world_md_shows():
    """docs/world.md's range table (task | low-high) says what base_range.yaml holds."""
    text = (ROOT / "docs" / "world.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| documented range |"))
    cells = [c.strip() for c in row.strip("|").split("|")[1:]]
    header = next(line for line in text.splitlines() if line.startswith("| seeds |"))
    tasks = [c.strip() for c in header.strip("|").split("|")[1:]]
    rng = documented_range("qwen2_5_vl", "toy")
    shown = {t: [float(x) for x in re.fullmatch(r"([\d.]+)-([\d.]+)", c).groups()] for t, c in zip(tasks, cells)}
    assert shown == {t: rng[t] for t in tasks}


@pytest.fixture(scope="module")
def toy_base():
    """The toy base model from the default cache: built here (about 5 minutes on 2 cores) unless `make demo`
    or an earlier test run already built it."""
    from training.run import run_in_processes
    from training.world.base import base_checkpoint

    return base_checkpoint("qwen2_5_vl", "toy", train=run_in_processes)


def test_the_toy_base_built_here_is_within_the_documented_range(toy_base):
    summary = json.loads((toy_base / BASE_JSON).read_text())
    assert out_of_range(summary["quick_check"], "qwen2_5_vl", "toy") == [], summary["quick_check"]
