"""Benchmarks from presets (`probes.evaluate --preset NAME=PATH [--profile ...]`): a local copy of a study
benchmark read by its preset, as items the engine generates from and the preset scores.

Each counted row (the preset's `counts`: SEED-Bench's video rows are not) becomes one item: the preset's
prompt as the instruction (the model's chat template wraps it), its single image, item id = the row's
number in the split (lmms-eval's doc_id). The rows are kept without their images, for scoring and for
aggregation where lmms-eval does more than a mean (MMStar). A row with several images, or one the reader
could not read, is bad: an error with --strict, else skipped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.dataset_files import DatasetFileError

from .benchmarks import Benchmark, BenchmarkData, BenchmarkError, Item
from .captions import Sample
from .presets import Preset, get_preset


@dataclass
class PresetData(BenchmarkData):
    preset: Preset | None = None
    records: list[dict] = field(default_factory=list)   # the items' rows, images dropped

    def score(self, predictions: list[str]) -> tuple[float, list[float | None]]:
        """(score 0-100 as lmms-eval aggregates it, per-item scores)."""
        per_item = [self.preset.score(p, r) for p, r in zip(predictions, self.records, strict=True)]
        return 100.0 * self.preset.aggregate(per_item, self.records), per_item


def parse_spec(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise BenchmarkError(f"--preset {spec!r}: expected NAME=PATH")
    return name, Path(path)


def load_preset(spec: str, profile: str, limit: int | None = None, strict: bool = True) -> PresetData:
    name, path = parse_spec(spec)
    try:
        preset = get_preset(name, profile)
        rows = preset.records(path, strict=strict)
    except (KeyError, ValueError) as e:   # unknown preset or profile; DatasetFileError is a ValueError
        raise BenchmarkError(f"--preset {spec}: {e.args[0] if isinstance(e, KeyError) else e}") from None
    bench = Benchmark(preset.name, path, scorer=preset.scorer, max_new_tokens=preset.max_new_tokens,
                      source=f"--preset ({profile} profile)")
    data = PresetData(bench, preset=preset)
    bad = []
    try:
        for i, row in enumerate(rows):
            if limit is not None and len(data.items) >= limit:
                break
            if not preset.counts(row):
                continue
            image = row.get("image")
            images = [] if image is None else image if isinstance(image, list) else [image]
            if len(images) > 1:
                bad.append(f"row {i}: {len(images)} images (the engine takes one)")
                continue
            image = images[0] if images else None   # a lazily opened PIL image: decoded when encoded
            if isinstance(image, dict):
                image = image.get("bytes")
            sample = Sample(f"{preset.name}/{i}", preset.prompt(row), None, image,
                            image_ref=f"{path}#{i}" if image is not None else "")
            data.items.append(Item(sample, [], str(i), 0))
            data.records.append({k: v for k, v in row.items() if k != "image"})
    except DatasetFileError as e:
        raise BenchmarkError(f"--preset {spec}: {e}") from None
    bad += [str(b) for b in rows.bad]
    if bad and strict:
        raise BenchmarkError(f"--preset {spec}: {len(bad)} bad rows; the first: {bad[0]}")
    if not data.items:
        raise BenchmarkError(f"--preset {spec}: no usable rows in {path}")
    data.n_skipped, data.first_skipped = len(bad), (bad[0] if bad else None)
    return data
