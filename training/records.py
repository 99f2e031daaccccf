"""Data records on disk, read one way by training and probes alike (torch-free; part of the shared layer).

- `read_records(path)`: every record of a file or folder: a LLaVA JSON list, JSON lines, a parquet file, a
  local Hugging Face dataset (`save_to_disk`) or a folder of parquet files. A JSON line that is not UTF-8
  or not JSON becomes a `BadLine` in its place, so a caller decides whether one bad record is fatal.
- `load_records(path)`: training's strict reading: every record a LLaVA conversation, else an error.
- `record_turns(record)`: [(instruction, answer), ...] of one LLaVA record.
- `caption_fields(record)`: (id, instruction, caption, image field) of a caption record, LLaVA or flat.
- `image_path(root, rel)`: the one image-root guard: a path from a data file may not leave its root.
- `Sample`: one (image, instruction, caption) the probes and benchmarks run a model on.
- `DataRoot` / `read_root`: a data folder and its world.json; `caption_set`: which caption set a run names.

A LLaVA record: {"id", "image": path relative to an images root, "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}; a flat caption record has image,
instruction (or prompt / question), caption (or answer / text) and an optional id.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
INSTRUCTION_KEYS = ("instruction", "prompt", "question")
CAPTION_KEYS = ("caption", "answer", "text")
# The number words of the counting probe (probes.tokensets), which the world's tokenizers keep whole.
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
                "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty "
                "ninety hundred thousand million billion").split()


class DataError(ValueError):
    """Missing or malformed data; the message names the file and, where there is one, the record."""


@dataclass(frozen=True)
class BadLine:
    """A JSON line that is not UTF-8 or not JSON: one bad record, kept in its place."""
    reason: str


# -- reading files ---------------------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list:
    """Every record of `path` (see the module docstring); a file that cannot be parsed at all is an error."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: file or folder does not exist")
    if p.is_dir() or p.suffix == ".parquet":
        return _read_table(p)
    if p.suffix == ".jsonl":
        return _read_jsonl(p)
    return _read_json(p)


def _read_json(path: Path) -> list[dict]:
    try:   # bytes that are not UTF-8 become lone surrogates: only the records holding them are bad
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    if isinstance(data, dict):  # {"data": [...]} or {"annotations": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list:
    """One record per non-blank line; a line that is not UTF-8 or not JSON is a BadLine in its place."""
    out: list = []
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
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
    except Exception as e:  # pyarrow / datasets raise many types for a corrupt file
        raise DataError(f"{path}: cannot read as parquet or a Hugging Face dataset ({e})") from e
    raise DataError(f"{path}: a folder with no dataset_info.json / state.json (save_to_disk) "
                    "and no *.parquet files")


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")        # lone surrogates (undecodable bytes, or a "\udc80" escape) fail here
        return True
    except UnicodeEncodeError:
        return False


# -- LLaVA conversations ---------------------------------------------------------------------------
def load_records(path: str | os.PathLike, max_examples: int | None = None) -> list[dict]:
    """The first `max_examples` records (all when None) of a LLaVA file, each checked: the strict reading
    training uses, where any bad record is an error naming it."""
    path = Path(path)
    records = read_records(path)
    if max_examples is not None:
        records = records[:max_examples]
    for i, r in enumerate(records):
        where = f"{path} record {i}"
        if isinstance(r, BadLine):
            raise DataError(f"{path}: {r.reason}")
        if not all(is_utf8(t) for turn in record_turns(r, where) for t in turn):
            raise DataError(f"{where} (id {r.get('id')!r}): text that is not valid UTF-8")
    if not records:
        raise DataError(f"{path}: no records")
    return records


def record_turns(record: dict, where: str = "record") -> list[tuple[str, str]]:
    """[(instruction, answer), ...] with the image placeholder removed from the instructions."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise DataError(f"{where}: not a LLaVA record (needs a 'conversations' list)")
    conv = record["conversations"]
    if len(conv) < 2 or len(conv) % 2:
        raise DataError(f"{where} (id {record.get('id')!r}): conversations must be (human, gpt) pairs")
    turns = []
    for j in range(0, len(conv), 2):
        h, g = conv[j], conv[j + 1]
        if not (isinstance(h, dict) and isinstance(g, dict) and h.get("from") == "human" and g.get("from") == "gpt"
                and isinstance(h.get("value"), str) and isinstance(g.get("value"), str)):
            raise DataError(f"{where} (id {record.get('id')!r}): turn {j // 2} is not a human then a gpt message "
                            "with string values")
        turns.append((IMAGE_PLACEHOLDER.sub(" ", h["value"]).strip(), g["value"].strip()))
    return turns


# -- captions --------------------------------------------------------------------------------------
def _first(rec: dict, keys: tuple[str, ...]):
    for k in keys:
        if rec.get(k) is not None:
            return rec[k]
    return None


def caption_fields(rec: Any, index: int, where: str) -> tuple[str, str, str, Any]:
    """(id, instruction, caption, image field) of one caption record in either shape: its first human
    and first gpt turn, or the flat keys."""
    if isinstance(rec, BadLine):
        raise DataError(f"{where}: {rec.reason}")
    if not isinstance(rec, dict):
        raise DataError(f"{where}: record {index} is a {type(rec).__name__}, not an object")
    rid = str(rec.get("id", index))
    conv = rec.get("conversations")
    if conv is not None:
        try:
            human = next(t["value"] for t in conv if t.get("from") in ("human", "user"))
            gpt = next(t["value"] for t in conv if t.get("from") in ("gpt", "assistant"))
        except (StopIteration, TypeError, KeyError, AttributeError):
            raise DataError(f"{where}: record {rid!r} needs a human and a gpt turn in 'conversations'") from None
        instruction, caption = human.replace(IMAGE_TOKEN, "").strip(), gpt
    else:
        instruction, caption = _first(rec, INSTRUCTION_KEYS), _first(rec, CAPTION_KEYS)
        if instruction is None:
            raise DataError(f"{where}: record {rid!r} has no instruction (expected 'conversations' or "
                            f"one of {', '.join(INSTRUCTION_KEYS)})")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: record {rid!r} has an empty caption")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(f"{where}: record {rid!r} has an empty instruction")
    image = rec.get("image")
    for text in (rid, instruction, caption, image if isinstance(image, str) else ""):
        if not is_utf8(text):
            raise DataError(f"{where}: record {rid!r} has text that is not valid UTF-8")
    return rid, instruction.strip(), caption.strip(), image


def image_ref(field: Any) -> str:
    """An image's identity independent of where the data set lies: its relative path or a content digest."""
    if isinstance(field, dict):
        field = field.get("bytes") or field.get("path")
    if isinstance(field, (bytes, bytearray)):
        return "sha256:" + hashlib.sha256(field).hexdigest()[:16]
    if hasattr(field, "tobytes"):
        return "sha256:" + hashlib.sha256(field.tobytes()).hexdigest()[:16]
    return str(field or "")


# -- images ----------------------------------------------------------------------------------------
def image_path(root: Path | None, rel: str, where: str) -> Path:
    """`rel` under the images root; a path that would leave it (absolute, "..", a symlink pointing out) is
    refused, so a data file cannot make a command read arbitrary files."""
    if root is None:
        raise DataError(f"{where}: image {rel!r} but no images root to read it from")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"{where}: image path {rel!r} must be relative to the images root {root} and stay inside it")
    full = (root / p).resolve()
    if not full.is_relative_to(Path(root).resolve()):
        raise DataError(f"{where}: image {rel!r} resolves outside the images root {root}")
    return full


def resolve_image(field: Any, root: Path, rid: str, where: str) -> Any:
    """A record's image field as a Sample holds it: an existing file under `root` (absolute path), encoded
    bytes, or a PIL image."""
    if field is None:
        raise DataError(f"{where}: record {rid!r} has no image")
    if isinstance(field, dict):  # the HF Image feature as stored in parquet
        if field.get("bytes"):
            return bytes(field["bytes"])
        field = field.get("path")
        if not field:
            raise DataError(f"{where}: record {rid!r} has an image with neither bytes nor path")
    if hasattr(field, "convert"):
        return field
    if isinstance(field, (bytes, bytearray)):
        return bytes(field)
    if not isinstance(field, str):
        raise DataError(f"{where}: record {rid!r} has an image of type {type(field).__name__}")
    full = image_path(root, field, f"{where}: record {rid!r}")
    if not full.is_file():
        raise DataError(f"{where}: record {rid!r}: image file {root / field} does not exist")
    return str(full)


@dataclass(frozen=True)
class Sample:
    """One prompt a model runs on: an image, an instruction and (teacher-forced) the caption."""
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
            raise DataError(f"sample {self.id!r}: cannot read image {where} ({e})") from e

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


# -- data roots ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataRoot:
    root: Path | None            # the data folder (the world's, for world runs)
    world: dict | None           # its world.json, when it has one

    def path(self, rel: str | None) -> Path | None:
        """A path from world.json: relative to the root."""
        if rel is None:
            return None
        p = Path(rel)
        return p if p.is_absolute() else self.root / p


def read_root(root: str | os.PathLike) -> DataRoot:
    """A data folder and its world.json (when it has one); an error names what is wrong."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {str(root)!r} is not a folder")
    meta = root / "world.json"
    world = None
    if meta.is_file():
        try:
            world = json.loads(meta.read_text())
        except ValueError as e:
            raise DataError(f"{meta}: not valid JSON ({e})") from None
    return DataRoot(root.resolve(), world)


def cache_root() -> Path:
    """Where built data and models are cached: `$LMM_DRIFT_CACHE`, else `.cache` under the repository root."""
    env = os.environ.get("LMM_DRIFT_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / ".cache"


def caption_set(dr: DataRoot, probe_cfg: dict) -> dict | None:
    """{"path", "images"} of the caption set: the config's probe.captions / probe.images, else the world's."""
    if probe_cfg.get("captions"):
        images = probe_cfg.get("images")
        return {"path": str(Path(probe_cfg["captions"]).resolve()),
                "images": str(Path(images).resolve()) if images else None}
    if dr.world is not None and dr.world.get("captions"):
        return {"path": str(dr.path(dr.world["captions"])), "images": str(dr.path(dr.world.get("images")))}
    return None


def task_paths(name: str, data_cfg: dict, dr: DataRoot) -> tuple[Path | None, Path | None, Path | None]:
    """(train, test, images) of task `name` as a training config's `data` places them (training.data's
    rules, first match wins: data.tasks.NAME, the world.json entry, ROOT/tasks/NAME/); None where nothing
    names one (train None: an unknown task). Nothing is checked to exist."""
    over = (data_cfg.get("tasks") or {}).get(name) or {}
    train = test = images = None
    if dr.world is not None:
        entry = dr.world.get("tasks", {}).get(name)
        if entry is not None:
            train, test = dr.path(entry.get("train")), dr.path(entry.get("test"))
        elif name == "pretrain" and dr.world.get("pretrain"):
            train = dr.path(dr.world["pretrain"])
        images = dr.path(dr.world.get("images"))
    elif dr.root is not None:
        cand = dr.root / "tasks" / name / "train.json"
        if cand.is_file():
            train = cand
            test = dr.root / "tasks" / name / "test.json"
        images = dr.root / "images"
    if over.get("train"):
        train = Path(over["train"])
    if over.get("test"):
        test = Path(over["test"])
    images = Path(over["images"]) if over.get("images") else (
        Path(data_cfg["images"]) if data_cfg.get("images") else images)
    if images is None and train is not None:
        images = train.parent  # a lone JSON file: image paths relative to its folder
    return train, test, images
