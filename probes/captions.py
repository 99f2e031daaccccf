"""Caption data for the probes: (image, instruction, caption) samples from local files, read by the shared
layer's record reader (training.records); this module selects, checks and hashes them.

Formats (chosen by what the path is):
- LLaVA / LCS-558K JSON: a list of {"id", "image": path relative to the images root, "conversations":
  [{"from": "human", "value": "<image>\\n<instruction>"}, {"from": "gpt", "value": "<caption>"}]}
- JSONL: one such record per line, or a flat record (below) per line.
- a parquet file, or a local Hugging Face dataset folder (`save_to_disk`) or a folder of parquet files:
  rows in the LLaVA shape or flat: image (path, {"bytes", "path"} or PIL image), instruction
  (or prompt / question), caption (or answer / text), id (optional: the row number).

    cs = load_captions("blip_laion_cc_sbu_558k.json", images="LCS-558K/images", num_samples=1000)
    cs.samples[0].open_image(); cs.hash   # the exact subset's hash, recorded with every result

Selection: the first N records (the study's choice) or N drawn at random with a seed. The hash covers
the selected records' ids, image paths as written in the data (or the digest of embedded image bytes),
instructions and captions, in order, so moving the data set elsewhere keeps the hash. Image paths are resolved
under the images root and may not leave it; every selected image must exist and decode before anything runs.

Bad records (a JSONL line that is not JSON or not UTF-8, text that is not UTF-8, an empty caption or
instruction, a missing, unreadable or escaping image, a repeated id) are handled in one of two ways:
- strict: the N records selected must all be good; otherwise an error with their count and the first one.
- not strict (probes.run without --strict): bad records are skipped and counted, and the selection is the
  first N *good* records (random: the seeded draw, each bad record replaced by further seeded draws);
  `CaptionSet.report()` names the count and the first bad record, and the hash is of the samples used.
A file that cannot be parsed at all (a JSON list with a syntax error, a corrupt parquet) is always an error.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

from training.records import DataError as CaptionDataError  # the records' one error, under probes' old name
from training.records import Sample, caption_fields, image_ref, read_records, resolve_image

DEFAULT_NUM_SAMPLES = 1000  # the study's probe set: the first 1,000 LCS-558K records


@dataclass(frozen=True)
class CaptionSet:
    samples: list[Sample]
    name: str      # what the `dataset` column says: the file or folder name
    hash: str      # sha256 of the exact subset (hex, 16 chars)
    source: str    # the path it was read from
    n_skipped: int = 0                 # bad records skipped to make up the selection (not strict)
    first_skipped: str | None = None   # the first of them, named

    def report(self) -> str:
        """'' when nothing was skipped, else the count and the first bad record."""
        if not self.n_skipped:
            return ""
        return (f"skipped {self.n_skipped} bad caption record(s) and used the next good ones (--strict makes "
                f"this an error); the first: {self.first_skipped}")


def subset_hash(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        for part in (s.id, s.image_ref, s.instruction, s.caption or ""):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:16]


def load_captions(path: str | os.PathLike, images: str | os.PathLike | None = None,
                  num_samples: int | None = None, sample: str = "first", seed: int = 0,
                  strict: bool = True, text_only: bool = False) -> CaptionSet:
    """Read, select and validate a caption set.

    num_samples None: the first DEFAULT_NUM_SAMPLES (or all, if fewer). An explicit number larger than the
    set is an error. `sample` is "first" (the study's choice) or "random" (seeded, without replacement).
    Images resolve under `images` (default: the caption file's folder). Only the records examined are parsed.
    strict: the selected records must all be good; else bad records are skipped (see the module docstring).
    text_only (for text-only LMs): images are neither needed nor read; samples carry none, and the hash is the
    one the same records have with their images (it records image paths, not pixels).
    """
    path = Path(path)
    root = Path(images) if images is not None else (path if path.is_dir() else path.parent)
    where = str(path)
    if not root.is_dir() and not text_only:
        raise CaptionDataError(f"{root}: images root does not exist (captions {path})")
    records = read_records(path)
    if not records:
        raise CaptionDataError(f"{where}: no records")
    if num_samples is not None and num_samples > len(records):
        raise CaptionDataError(f"{where}: asked for {num_samples} samples but it has only {len(records)} records")
    if num_samples is not None and num_samples < 1:
        raise CaptionDataError(f"{where}: --num-samples must be at least 1, not {num_samples}")
    if sample not in ("first", "random"):
        raise ValueError(f"sample must be 'first' or 'random', not {sample!r}")
    n = num_samples if num_samples is not None else min(DEFAULT_NUM_SAMPLES, len(records))
    seen: set[str] = set()

    def check(i: int) -> Sample:
        rid, instruction, caption, field = caption_fields(records[i], i, where)
        if rid in seen:
            raise CaptionDataError(f"{where}: record id {rid!r} appears twice among the selected records")
        if text_only:
            seen.add(rid)
            return Sample(rid, instruction, caption, None, image_ref(field))
        s = Sample(rid, instruction, caption, resolve_image(field, root, rid, where), image_ref(field))
        try:
            s.open_image()      # decodes it: an unreadable image is found now, not inside a checkpoint's run
        except CaptionDataError as e:
            raise CaptionDataError(f"{where}: record {rid!r}: cannot read image {field!r} ({e.__cause__})") from None
        seen.add(rid)
        return s

    good: dict[int, Sample] = {}
    bad: list[str] = []
    rng = random.Random(seed)
    batch = list(range(n)) if sample == "first" else rng.sample(range(len(records)), n)
    examined: set[int] = set()
    while batch:
        examined.update(batch)
        for i in sorted(batch):
            try:
                good[i] = check(i)
            except CaptionDataError as e:
                bad.append(str(e))
        need = n - len(good)
        if not bad or need <= 0 or strict:
            break
        if sample == "first":          # the next records in order
            batch = list(range(max(examined) + 1, min(len(records), max(examined) + 1 + need)))
        else:                          # further seeded draws among the records not drawn yet
            rest = [i for i in range(len(records)) if i not in examined]
            batch = rng.sample(rest, min(need, len(rest)))
    if bad and strict:
        raise CaptionDataError(f"{where}: {len(bad)} bad record(s) among the {n} selected; the first: {bad[0]}"
                               if len(bad) > 1 else bad[0])
    if len(good) < n and num_samples is not None:       # by default: the first 1000 good ones, or all of them
        raise CaptionDataError(f"{where}: asked for {n} samples but only {len(good)} of its {len(records)} records "
                               f"are usable ({len(bad)} bad; the first: {bad[0] if bad else '-'})")
    samples = [good[i] for i in sorted(good)]
    if not samples:
        raise CaptionDataError(f"{where}: no usable records ({len(bad)} bad; the first: {bad[0]})")
    return CaptionSet(samples, path.name, subset_hash(samples), str(path), len(bad), bad[0] if bad else None)
