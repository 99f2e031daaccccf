"""Caption data for the probes: (image, instruction, caption) samples from local files.

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
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
DEFAULT_NUM_SAMPLES = 1000  # the study's probe set: the first 1,000 LCS-558K records
INSTRUCTION_KEYS = ("instruction", "prompt", "question")
CAPTION_KEYS = ("caption", "answer", "text")


class CaptionDataError(ValueError):
    """Bad caption data; the message names the file and, where there is one, the record."""


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not UTF-8 or not JSON: one bad record, kept in its place."""
    reason: str


@dataclass(frozen=True)
class Sample:
    id: str
    instruction: str
    caption: str | None           # None for prompts that are only generated from (evaluation)
    image: Any = None             # absolute path (str), encoded bytes, a PIL image, or None (text only)
    image_ref: str = ""           # what the subset hash records: the path as the data wrote it, or a digest

    def open_image(self):
        """The image as RGB PIL; errors name the sample and the file."""
        from PIL import Image, UnidentifiedImageError

        if self.image is None:
            return None
        if hasattr(self.image, "convert"):
            return self.image.convert("RGB")
        try:
            src = io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image
            with Image.open(src) as im:
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            where = "its embedded bytes" if isinstance(self.image, bytes) else self.image
            raise CaptionDataError(f"sample {self.id!r}: cannot read image {where} ({e})") from e

    def image_size(self) -> tuple[int, int] | None:
        """(height, width) read from the image header only (for length estimates)."""
        from PIL import Image

        if self.image is None:
            return None
        if hasattr(self.image, "size"):
            w, h = self.image.size
            return h, w
        try:
            with Image.open(io.BytesIO(self.image) if isinstance(self.image, bytes) else self.image) as im:
                w, h = im.size
                return h, w
        except Exception:  # unreadable: open_image raises the clear error later; sort it as size 0
            return 0, 0


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


# -- reading records -------------------------------------------------------------------------------
def _read_json(path: Path) -> list[dict]:
    try:   # bytes that are not UTF-8 become lone surrogates: only the records holding them are bad
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as e:
        raise CaptionDataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except OSError as e:
        raise CaptionDataError(f"{path}: cannot read ({e})") from e
    if isinstance(data, dict):  # {"data": [...]} or {"annotations": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise CaptionDataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list:
    """One record per non-blank line; a line that is not UTF-8 or not JSON is a BadLine in its place."""
    out: list = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CaptionDataError(f"{path}: cannot read ({e})") from e
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            out.append(BadLine(f"line {n} is not valid UTF-8 (byte {e.start})"))
        except json.JSONDecodeError as e:
            out.append(BadLine(f"malformed JSON on line {n} column {e.colno}: {e.msg}"))
    return out


def _read_table(path: Path) -> list[dict]:
    try:
        if path.is_file():
            import pandas as pd
            return pd.read_parquet(path).to_dict("records")
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            import datasets
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
            return list(ds)
        files = sorted(path.rglob("*.parquet"))
        if files:
            import pandas as pd
            return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).to_dict("records")
    except CaptionDataError:
        raise
    except Exception as e:  # pyarrow / datasets raise many types for a corrupt file
        raise CaptionDataError(f"{path}: cannot read as parquet or a Hugging Face dataset ({e})") from e
    raise CaptionDataError(f"{path}: a folder with no dataset_info.json / state.json (save_to_disk) "
                           "and no *.parquet files")


def read_records(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise CaptionDataError(f"{p}: caption file or folder does not exist")
    if p.is_dir() or p.suffix == ".parquet":
        return _read_table(p)
    if p.suffix == ".jsonl":
        return _read_jsonl(p)
    return _read_json(p)


def _first(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if rec.get(k) is not None:
            return rec[k]
    return None


def _parse(rec: Any, index: int, where: str) -> tuple[str, str, str, Any]:
    """(id, instruction, caption, image field) from one record in either shape."""
    if isinstance(rec, BadLine):
        raise CaptionDataError(f"{where}: {rec.reason}")
    if not isinstance(rec, dict):
        raise CaptionDataError(f"{where}: record {index} is a {type(rec).__name__}, not an object")
    rid = str(rec.get("id", index))
    conv = rec.get("conversations")
    if conv is not None:
        try:
            human = next(t["value"] for t in conv if t.get("from") in ("human", "user"))
            gpt = next(t["value"] for t in conv if t.get("from") in ("gpt", "assistant"))
        except (StopIteration, TypeError, KeyError, AttributeError):
            raise CaptionDataError(f"{where}: record {rid!r} needs a human and a gpt turn in 'conversations'") \
                from None
        instruction, caption = human.replace(IMAGE_TOKEN, "").strip(), gpt
    else:
        instruction, caption = _first(rec, INSTRUCTION_KEYS), _first(rec, CAPTION_KEYS)
        if instruction is None:
            raise CaptionDataError(f"{where}: record {rid!r} has no instruction (expected 'conversations' or "
                                   f"one of {', '.join(INSTRUCTION_KEYS)})")
    if not isinstance(caption, str) or not caption.strip():
        raise CaptionDataError(f"{where}: record {rid!r} has an empty caption")
    if not isinstance(instruction, str) or not instruction.strip():
        raise CaptionDataError(f"{where}: record {rid!r} has an empty instruction")
    image = rec.get("image")
    for text in (rid, instruction, caption, image if isinstance(image, str) else ""):
        if not _is_utf8(text):
            raise CaptionDataError(f"{where}: record {rid!r} has text that is not valid UTF-8")
    return rid, instruction.strip(), caption.strip(), image


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")        # lone surrogates (undecodable bytes, or a "\udc80" escape) fail here
        return True
    except UnicodeEncodeError:
        return False


def _image_ref(field: Any) -> str:
    """The image's identity independent of where the data set lies: its relative path or a content digest."""
    if isinstance(field, dict):
        field = field.get("bytes") or field.get("path")
    if isinstance(field, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(field).hexdigest()[:16]
    if hasattr(field, "tobytes"):
        return "sha256:" + hashlib.sha256(field.tobytes()).hexdigest()[:16]
    return str(field or "")


def _resolve_image(field: Any, root: Path, rid: str, where: str) -> Any:
    if field is None:
        raise CaptionDataError(f"{where}: record {rid!r} has no image")
    if isinstance(field, dict):  # the HF Image feature as stored in parquet
        if field.get("bytes"):
            return bytes(field["bytes"])
        field = field.get("path")
        if not field:
            raise CaptionDataError(f"{where}: record {rid!r} has an image with neither bytes nor path")
    if hasattr(field, "convert"):
        return field
    if isinstance(field, (bytes, bytearray)):
        return bytes(field)
    if not isinstance(field, str):
        raise CaptionDataError(f"{where}: record {rid!r} has an image of type {type(field).__name__}")
    rel = Path(field)
    if rel.is_absolute() or ".." in rel.parts:
        raise CaptionDataError(f"{where}: record {rid!r}: image path {field!r} must be relative to the images "
                               f"root {root} and stay inside it")
    full = (root / rel).resolve()
    if not full.is_relative_to(root.resolve()):  # a symlink out of the root
        raise CaptionDataError(f"{where}: record {rid!r}: image {field!r} resolves outside the images root {root}")
    if not full.is_file():
        raise CaptionDataError(f"{where}: record {rid!r}: image file {root / rel} does not exist")
    return str(full)


def load_captions(path: str | os.PathLike, images: str | os.PathLike | None = None,
                  num_samples: int | None = None, sample: str = "first", seed: int = 0,
                  strict: bool = True) -> CaptionSet:
    """Read, select and validate a caption set.

    num_samples None: the first DEFAULT_NUM_SAMPLES (or all, if fewer). An explicit number larger than the
    set is an error. `sample` is "first" (the study's choice) or "random" (seeded, without replacement).
    Images resolve under `images` (default: the caption file's folder). Only the records examined are parsed.
    strict: the selected records must all be good; else bad records are skipped (see the module docstring).
    """
    path = Path(path)
    root = Path(images) if images is not None else (path if path.is_dir() else path.parent)
    where = str(path)
    if not root.is_dir():
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
        rid, instruction, caption, field = _parse(records[i], i, where)
        if rid in seen:
            raise CaptionDataError(f"{where}: record id {rid!r} appears twice among the selected records")
        s = Sample(rid, instruction, caption, _resolve_image(field, root, rid, where), _image_ref(field))
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
