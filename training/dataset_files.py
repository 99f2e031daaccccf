"""Rows of a dataset's local copy, in the layouts the Hugging Face Hub and `datasets` leave on disk.

Torch-free and `datasets`-free (pyarrow and PIL only), so it runs where `datasets` is not installed.
`read_rows(path, config=None, split=None)` reads:

- a Hub snapshot: parquet shards named by split (`test-00000-of-00002.parquet`, `data/validation-*.parquet`,
  `test/0000.parquet`), with configs as sub-folders (lmms-lab/DocVQA's `DocVQA/`, `InfographicVQA/`);
  a snapshot holding a single parquet file not named by a split (Lin-Chen/MMStar's `mmstar.parquet`) is
  read as the split asked for;
- a `save_to_disk` folder: `state.json` + arrow files (one split), or `dataset_dict.json` with one
  sub-folder per split;
- a TSV whose `image` column holds base64 images (VLMEvalKit / OpenCompass layout of MMStar); an image
  field of at most 64 characters names the `index` of the row whose image it shares, as VLMEvalKit
  writes them;
- a single `.parquet`, `.arrow` or `.tsv` file, read as is.

Rows come out as dicts as `datasets` yields them: an image column (`{bytes, path}` structs, datasets'
Image feature) or a list of them (Sequence(Image), SEED-Bench's frames) becomes PIL images, opened
lazily (PIL reads the header now, the pixels on first use; a struct without bytes is read from its path,
relative to the dataset folder); a null image stays None; other columns are plain Python values (TSV
fields are strings). With `decode_images=False` images come out as their encoded bytes instead (checked
to open all the same), for callers that copy them to files unchanged (training.prepare).

Bad rows (an image that does not open, a TSV line with the wrong number of fields) are never silent:
they are skipped, counted and named in `Rows.bad` (and a warning when iteration ends), or with
`strict=True` raise `DatasetFileError` at the first.
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}(?:-.*)?$")   # test-00000-of-00002[-hash]
_SPLIT_NAMES = {"train", "test", "validation", "val", "dev"}
_BATCH_ROWS = 64          # parquet/arrow rows decoded at a time: images stay bytes until their row is due
_TSV_IMAGE_REF_LEN = 64   # VLMEvalKit: an image field this short is the index of another row's image
_NAMED_BAD = 5            # bad rows named in the end-of-iteration warning


class DatasetFileError(ValueError):
    """A dataset folder that cannot be read as any known layout, or a bad row under strict=True."""


@dataclass(frozen=True)
class BadRow:
    file: str
    row: int          # 0-based row number within the file
    reason: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}"


# -- finding the files -----------------------------------------------------------------------------
def find_files(path: str | Path, config: str | None = None, split: str | None = None) -> list[Path]:
    """The data files of (config, split) under `path`, in reading order; raises DatasetFileError."""
    path = Path(path)
    if path.is_file():
        if path.suffix in (".parquet", ".arrow", ".tsv"):
            return [path]
        raise DatasetFileError(f"{path}: not a .parquet, .arrow or .tsv file")
    if not path.is_dir():
        raise DatasetFileError(f"{path}: no such file or folder")
    base = _config_dir(path, config)
    if (base / "dataset_dict.json").is_file():
        return _saved_dict_files(base, split)
    if (base / "state.json").is_file():
        return _saved_files(base)
    if parquet := sorted(base.rglob("*.parquet")):
        return _split_files(base, parquet, split, what="parquet")
    if tsv := sorted(base.rglob("*.tsv")):
        return _split_files(base, tsv, split, what="TSV")
    raise DatasetFileError(f"{path}: no parquet shards, save_to_disk files (state.json / dataset_dict.json) "
                           f"or TSV file found")


def _config_dir(root: Path, config: str | None) -> Path:
    """The config's sub-folder (at most two levels down) when there is one, else the folder itself."""
    if config:
        for candidate in (root / config, *root.glob(f"*/{config}")):
            if candidate.is_dir():
                return candidate
    configs = sorted(p.name for p in root.iterdir()
                     if p.is_dir() and any(_SHARD.match(f.name.split(".")[0]) for f in p.glob("*.parquet")))
    if len(configs) > 1:
        # Several config folders and none is the one asked for: reading them all would mix configs.
        raise DatasetFileError(f"{root}: holds the configs {', '.join(configs)}; "
                               + (f"none is {config!r}" if config else "name one"))
    return root


def _split_of(base: Path, file: Path) -> str:
    """The split a file belongs to by its name (`test-00000-of-00002`, `test`) or its folder (`test/0000`)."""
    stem = file.name.split(".")[0]
    if m := _SHARD.match(stem):
        return m.group("split")
    parent = file.parent
    if parent != base and re.fullmatch(r"\d+", stem):
        return parent.name
    return stem


def _split_files(base: Path, files: list[Path], split: str | None, *, what: str) -> list[Path]:
    if split is None:
        return files
    chosen = [f for f in files if _split_of(base, f) == split]
    if chosen:
        return chosen
    if len(files) == 1 and _split_of(base, files[0]) not in _SPLIT_NAMES:
        return files  # one file named by no split is the whole dataset (MMStar's mmstar.parquet)
    found = sorted({_split_of(base, f) for f in files})
    raise DatasetFileError(f"{base}: no {what} file of split {split!r}; found: {', '.join(found)}")


def _saved_dict_files(base: Path, split: str | None) -> list[Path]:
    splits = json.loads((base / "dataset_dict.json").read_text())["splits"]
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise DatasetFileError(f"{base}: save_to_disk splits are {', '.join(splits)}; asked for {split!r}")
    return _saved_files(base / split)


def _saved_files(folder: Path) -> list[Path]:
    state = json.loads((folder / "state.json").read_text())
    files = [folder / f["filename"] for f in state.get("_data_files", [])]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise DatasetFileError(f"{folder}: state.json names arrow files that are missing: {missing or 'none named'}")
    return files


# -- images ----------------------------------------------------------------------------------------
def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} == {"bytes", "path"}


def image_columns(schema: pa.Schema) -> tuple[set[str], set[str]]:
    """(columns of single images, columns of image lists), recognised by datasets' {bytes, path} struct."""
    single, lists = set(), set()
    for f in schema:
        if _is_image_struct(f.type):
            single.add(f.name)
        elif (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and _is_image_struct(f.type.value_type):
            lists.add(f.name)
    return single, lists


def image_bytes(value, root: Path | None = None) -> bytes | None:
    """The encoded image of a `{bytes, path}` struct (or raw bytes); a path is relative to `root`."""
    if value is None:
        return None
    data = value.get("bytes") if isinstance(value, dict) else value
    if data is None and isinstance(value, dict) and value.get("path"):
        file = Path(value["path"])
        file = file if file.is_absolute() or root is None else root / file
        data = file.read_bytes()  # read now: a lazily opened file handle per row would run out of handles
    if data is None:
        raise ValueError("image struct has neither bytes nor a path")
    return bytes(data)


def open_image(value, root: Path | None = None) -> Image.Image | None:
    """A `{bytes, path}` struct (or raw bytes) as a lazily opened PIL image; None stays None."""
    data = image_bytes(value, root)
    return None if data is None else Image.open(io.BytesIO(data))


def checked_bytes(value, root: Path | None = None) -> bytes | None:
    """image_bytes, after PIL has checked that they open (so a bad image is a bad row either way)."""
    data = image_bytes(value, root)
    if data is not None:
        Image.open(io.BytesIO(data)).verify()
    return data


# -- reading ---------------------------------------------------------------------------------------
class Rows:
    """Iterator over the rows of (config, split) under `path`; bad rows skipped into `.bad` (see module doc)."""

    def __init__(self, path: str | Path, config: str | None = None, split: str | None = None,
                 strict: bool = False, decode_images: bool = True):
        self.path = Path(path)
        self.files = find_files(self.path, config, split)   # a wrong layout fails here, before any model runs
        self.strict = strict
        self.image = open_image if decode_images else checked_bytes
        self.bad: list[BadRow] = []
        self._rows = self._all_rows()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return next(self._rows)

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    def _all_rows(self) -> Iterator[dict]:
        for file in self.files:
            reader = _tsv_rows if file.suffix == ".tsv" else _table_rows
            yield from reader(file, self._skip, self.image)
        if self.bad:
            named = "; ".join(str(b) for b in self.bad[:_NAMED_BAD])
            more = f" (and {len(self.bad) - _NAMED_BAD} more)" if len(self.bad) > _NAMED_BAD else ""
            warnings.warn(f"{self.path}: skipped {len(self.bad)} bad rows: {named}{more}", stacklevel=2)

    def _skip(self, file: Path, row: int, reason: str) -> None:
        bad = BadRow(str(file), row, reason)
        if self.strict:
            raise DatasetFileError(f"bad row: {bad}")
        self.bad.append(bad)


def read_rows(path: str | Path, config: str | None = None, split: str | None = None,
              strict: bool = False, decode_images: bool = True) -> Rows:
    return Rows(path, config, split, strict, decode_images)


def _batches(file: Path) -> Iterator[pa.RecordBatch]:
    if file.suffix == ".parquet":
        yield from pq.ParquetFile(file).iter_batches(batch_size=_BATCH_ROWS)
        return
    source = pa.memory_map(str(file))
    try:  # datasets writes arrow IPC streams; accept the file format too
        reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(source)
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    yield from reader


def _table_rows(file: Path, skip, image) -> Iterator[dict]:
    row = 0
    for batch in _batches(file):
        single, lists = image_columns(batch.schema)
        for record in batch.to_pylist():
            try:
                for col in single:
                    record[col] = image(record[col], file.parent)
                for col in lists:
                    record[col] = None if record[col] is None else [image(v, file.parent) for v in record[col]]
            except (OSError, ValueError, UnidentifiedImageError) as e:
                skip(file, row, f"image does not open ({e})")
            else:
                yield record
            row += 1


def _tsv_rows(file: Path, skip, image) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with open(file, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f, delimiter="\t"))
    by_index = {r.get("index"): r.get("image") for r in records}
    for row, record in enumerate(records):
        if None in record or None in record.values():
            skip(file, row, "wrong number of fields")
            continue
        if "image" in record:
            try:
                record["image"] = image(_tsv_image(record["image"], by_index))
            except (OSError, ValueError, binascii.Error, UnidentifiedImageError) as e:
                skip(file, row, f"image does not open ({e})")
                continue
        yield record


def _tsv_image(field: str, by_index: dict) -> bytes:
    if len(field) <= _TSV_IMAGE_REF_LEN:
        shared = by_index.get(field)
        if shared is None or len(shared) <= _TSV_IMAGE_REF_LEN:
            raise ValueError(f"image field {field!r} is neither base64 nor the index of a row with an image")
        field = shared
    return base64.b64decode(field, validate=True)
