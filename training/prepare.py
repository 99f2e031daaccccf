"""Target training data from the targets' public layouts, in the LLaVA JSON + images the loop reads.

    python -m training.prepare NAME --source PATH --out DIR [--images DIR] [--seed 0]

writes DIR/tasks/NAME/{train,test}.json (LLaVA records, training.records), the images under
DIR/images/NAME/ (named by a digest of their bytes, so an image shared by several rows is written once)
and DIR/tasks/NAME/prepare.json (source, seed, per split the records written and every bad row). DIR is
then a `data.root` by the convention of training.data (ROOT/tasks/NAME/train.json, images under
ROOT/images), so several targets prepared into one DIR make one root. Torch-free.

Sources (splits as the sources give them; a train and a test split are required):
- cub200: the CUB_200_2011 folder (images/, images.txt, classes.txt, image_class_labels.txt,
  train_test_split.txt); the official split. Each image becomes the study's 26-way multiple choice
  (LMM_CL utils/cub200_to_llava.py, the format of Jessemel/cub200-test that probes.presets scores): one of
  ten question templates, "Answer with the option's letter from the given choices directly.", then
  "A. name" .. "Z. name" with the right class at a random letter among 25 other random classes (all
  classes when there are fewer than 26); the answer is the letter. LMM_CL draws without a seed; here the
  draw of each image depends only on (--seed, image id).
- pathvqa: flaviagiammarino/path-vqa as the Hub leaves it (parquet with image, question, answer; train,
  validation, test).
- textvqa: lmms-lab/textvqa as the Hub leaves it; the target is the most frequent of the ten answers (as
  LMM_CL's converter takes it); its test split has no answers, so test.json is the validation split, the
  one the study evaluates.
- pixmocount: allenai/pixmo-count's parquet (image_url, image_sha256, count, label; no images) and
  `--images DIR`, the images the user downloaded from the URLs, named by image_sha256 (any extension, as
  LMM_CL's downloader names them) or as the URL's last path part. A row whose image is not there is a bad
  row; `--verify-sha256` also makes one whose file's digest differs (a placeholder served for a deleted
  photo) a bad row. Text as LMM_CL's converter writes it ("There are 3 dogs in this image.").
- timeclock: the clock-reading training set has no known public layout: accepted is a Hub-layout parquet
  folder, or a folder with train.json / test.json (or .jsonl) records, each row with an `image` (a
  `{bytes, path}` struct, or a path relative to the source folder) and the time as `time` ("H:MM") or
  `hour` and `minute` columns. The answer is "HH:MM" as LMM_CL's converter writes it.

Bad rows (an image missing or not opening, a field missing or malformed) are skipped, counted and named:
one summary line per split on stdout naming the first few, all of them in prepare.json; never silent.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .dataset_files import DatasetFileError, checked_bytes, read_rows
from .records import BadLine, DataError, image_path, read_records

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CUB_TEMPLATES = (  # LMM_CL utils/cub200_to_llava.py's ten question templates
    "What species is the bird in this photo?",
    "Can you identify the bird species in this image?",
    "Which bird species is shown in this picture?",
    "What type of bird is depicted in this photograph?",
    "Identify the species of the bird in this image.",
    "What is the bird species presented in this photo?",
    "Which of the following species does this bird belong to?",
    "What would you classify this bird as?",
    "From the options below, what species is this bird?",
    "Looking at this bird, what species would you say it is?",
)
CUB_OPTIONS = 26
CLOCK_QUESTION = "What time does the clock show in this image?"
_NAMED_BAD = 5   # bad rows named in a split's summary line


class PrepareError(ValueError):
    """A source that cannot be prepared at all (wrong layout, a required split missing)."""


class BadRowError(ValueError):
    """One row that cannot become a record; the message says why."""


@dataclass
class Split:
    name: str
    records: list[dict] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)

    def summary(self, task: str) -> str:
        named = "; ".join(self.bad[:_NAMED_BAD]) + (f" (and {len(self.bad) - _NAMED_BAD} more)"
                                                    if len(self.bad) > _NAMED_BAD else "")
        return f"{task} {self.name}: {len(self.records)} records, {len(self.bad)} bad rows" + (
            f": {named}" if self.bad else "")


class ImageStore:
    """Writes images under OUT/images/TASK/, named by a digest of their bytes; returns the path the
    records hold (relative to OUT/images)."""

    def __init__(self, out: Path, task: str):
        self.images, self.task = out / "images", task
        (self.images / task).mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> str:
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "png").lower()
                im.verify()
        except Exception as e:  # PIL raises many types for a broken file
            raise BadRowError(f"image does not open ({e})") from None
        ext = {"jpeg": "jpg", "mpo": "jpg"}.get(fmt, fmt)
        rel = f"{self.task}/{hashlib.sha256(data).hexdigest()[:20]}.{ext}"
        if not (self.images / rel).is_file():
            (self.images / rel).write_bytes(data)
        return rel


def llava(rid: str, image: str, question: str, answer: str) -> dict:
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": answer}]}


# -- CUB-200-2011 ----------------------------------------------------------------------------------
def _id_table(path: Path, bad: list[str]) -> dict[int, str]:
    """A CUB "ID VALUE" file; malformed lines are named in `bad`."""
    if not path.is_file():
        raise PrepareError(f"{path}: missing (not a CUB_200_2011 folder?)")
    table = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        key, _, value = line.strip().partition(" ")
        if not line.strip():
            continue
        if not key.isdigit() or not value.strip():
            bad.append(f"{path.name} line {n}: not 'ID VALUE'")
            continue
        table[int(key)] = value.strip()
    return table


def cub_class_name(raw: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black footed Albatross' (LMM_CL's naming)."""
    name = raw.replace("_", " ")
    prefix, dot, rest = name.partition(".")
    return rest.strip() if dot and prefix.isdigit() else name


def cub_question(classes: dict[int, str], correct: int, rng: random.Random) -> tuple[str, str]:
    """(question, letter): a template, the instruction, and the lettered options with `correct` among them."""
    n = min(CUB_OPTIONS, len(classes))
    slot = rng.randrange(n)
    others = rng.sample(sorted(c for c in classes if c != correct), n - 1)
    options = others[:slot] + [correct] + others[slot:]
    lines = [f"{chr(65 + i)}. {classes[c]}" for i, c in enumerate(options)]
    question = f"{rng.choice(CUB_TEMPLATES)}\n{MC_INSTRUCTION}\n" + "\n".join(lines)
    return question, chr(65 + slot)


def prepare_cub200(source: Path, store: ImageStore, seed: int, **_) -> list[Split]:
    bad: list[str] = []
    classes = {k: cub_class_name(v) for k, v in _id_table(source / "classes.txt", bad).items()}
    paths = _id_table(source / "images.txt", bad)
    labels = _id_table(source / "image_class_labels.txt", bad)
    is_train = _id_table(source / "train_test_split.txt", bad)
    splits = {"train": Split("train", bad=list(bad)), "test": Split("test")}
    for image_id, rel in sorted(paths.items()):
        flag = is_train.get(image_id)
        split = splits["train" if flag == "1" else "test"]
        try:
            if flag not in ("0", "1"):
                raise BadRowError("no 0/1 entry in train_test_split.txt")
            label = labels.get(image_id)
            if label is None or not label.isdigit() or int(label) not in classes:
                raise BadRowError(f"class label {label!r} is not in classes.txt")
            image = _read_file(source / "images" / rel)
            question, letter = cub_question(classes, int(label), random.Random(f"{seed}:{image_id}"))
            split.records.append(llava(f"cub200-{image_id:05d}", store.put(image), f"<image>\n{question}", letter))
        except BadRowError as e:
            split.bad.append(f"image {image_id} ({rel}): {e}")
    return list(splits.values())


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        raise BadRowError(f"image file {path} is missing or unreadable") from None


# -- Hub-layout tables -----------------------------------------------------------------------------
def _table_splits(source: Path, splits: dict[str, str], record: Callable[[dict, int], tuple],
                  store: ImageStore, task: str, optional: tuple[str, ...] = ()) -> list[Split]:
    """One Split per (source split -> output split); `record(row, n)` gives (id, image bytes, question,
    answer) or raises BadRowError. Rows the reader cannot read (an image that does not open) are bad too."""
    out = []
    for src, name in splits.items():
        try:
            rows = read_rows(source, split=src, decode_images=False)
        except DatasetFileError as e:
            if src in optional:
                continue
            raise PrepareError(f"{task}: {e}") from None
        split = Split(name)
        for k, row in enumerate(_quiet(rows)):
            n = k + rows.n_bad   # the row's number in the split, counting the rows the reader skipped
            try:
                rid, image, question, answer = record(row, n)
                split.records.append(llava(f"{task}-{src}-{rid}", store.put(image), question, answer))
            except BadRowError as e:
                split.bad.append(f"{src} row {n}: {e}")
        split.bad.extend(f"{Path(b.file).name} row {b.row}: {b.reason}" for b in rows.bad)
        out.append(split)
    return out


def _quiet(rows) -> Iterator[dict]:
    """The reader's rows without its end-of-iteration warning: the split's summary names them instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from rows


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRowError(f"no {key!r} text")
    return value.strip()


def _image(row: dict) -> bytes:
    if row.get("image") is None:
        raise BadRowError("no image")
    return row["image"]


def _pathvqa_record(row: dict, n: int) -> tuple:
    return n, _image(row), f"<image>\n{_text(row, 'question')}", _text(row, "answer")


def _textvqa_record(row: dict, n: int) -> tuple:
    answers = [a for a in row.get("answers") or [] if isinstance(a, str) and a.strip()]
    if not answers:
        raise BadRowError("no answers")
    return (row.get("question_id", n), _image(row), f"<image>\n{_text(row, 'question')}",
            Counter(answers).most_common(1)[0][0].strip())


def prepare_pathvqa(source: Path, store: ImageStore, **_) -> list[Split]:
    return _table_splits(source, {"train": "train", "validation": "validation", "test": "test"},
                         _pathvqa_record, store, "pathvqa", optional=("validation",))


def prepare_textvqa(source: Path, store: ImageStore, **_) -> list[Split]:
    return _table_splits(source, {"train": "train", "validation": "test"}, _textvqa_record, store, "textvqa")


# -- PixMo-Count -----------------------------------------------------------------------------------
def _image_index(folder: Path) -> dict[str, Path]:
    """Every file of the download folder by its name and by its stem."""
    index = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            index.setdefault(f.stem, f)
            index.setdefault(f.name, f)
    return index


def _pixmo_record(index: dict[str, Path], verify: bool) -> Callable[[dict, int], tuple]:
    def record(row: dict, n: int) -> tuple:
        sha, url, label = row.get("image_sha256"), row.get("image_url") or "", _text(row, "label")
        count = row.get("count")
        if not isinstance(count, int) or count < 0:
            raise BadRowError(f"count {count!r} is not a non-negative integer")
        file = index.get(sha) or index.get(url.rsplit("/", 1)[-1].split("?")[0])
        if file is None:
            raise BadRowError(f"image {sha} ({url}) is not in the images folder")
        data = _read_file(file)
        if verify and hashlib.sha256(data).hexdigest() != sha:
            raise BadRowError(f"image {file.name} does not have the sha256 {sha} (a changed or placeholder download)")
        answer = f"There {'is' if count == 1 else 'are'} {count} {label} in this image."
        return sha, data, f"How many {label} are in this image?\n<image>", answer
    return record


def prepare_pixmocount(source: Path, store: ImageStore, images: Path | None = None,
                       verify_sha256: bool = False, **_) -> list[Split]:
    if images is None or not images.is_dir():
        raise PrepareError(f"pixmocount: --images must name the folder of the downloaded images (got {images})")
    record = _pixmo_record(_image_index(images), verify_sha256)
    return _table_splits(source, {"train": "train", "validation": "validation", "test": "test"}, record, store,
                         "pixmocount", optional=("validation",))


# -- clock reading ---------------------------------------------------------------------------------
def clock_time(row: dict) -> str:
    """'HH:MM' from a `time` field ("3:45", "03:45") or `hour` and `minute` fields."""
    if row.get("time") is not None:
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*", str(row["time"]))
        if not m:
            raise BadRowError(f"time {row['time']!r} is not H:MM")
        hour, minute = int(m.group(1)), int(m.group(2))
    else:
        try:
            hour, minute = int(row["hour"]), int(row["minute"])
        except (KeyError, TypeError, ValueError):
            raise BadRowError("neither a 'time' nor integer 'hour' and 'minute' fields") from None
    if not (0 <= hour < 24 and 0 <= minute < 60):
        raise BadRowError(f"time {hour}:{minute:02d} is out of range")
    return f"{hour:02d}:{minute:02d}"


def _clock_record(source: Path) -> Callable[[dict, int], tuple]:
    def record(row: dict, n: int) -> tuple:
        image = row.get("image")
        if isinstance(image, str):
            image = _read_file(_inside(source, image))
        elif isinstance(image, dict):
            try:
                image = checked_bytes(image, source)
            except (OSError, ValueError) as e:
                raise BadRowError(f"image does not open ({e})") from None
        return row.get("id", n), _image({"image": image}), f"{CLOCK_QUESTION}\n<image>", clock_time(row)
    return record


def _inside(root: Path, rel: str) -> Path:
    try:
        return image_path(root, rel, "image")
    except DataError as e:
        raise BadRowError(str(e)) from None


def _json_splits(source: Path, record, store: ImageStore) -> list[Split]:
    out = []
    for name in ("train", "test"):
        files = [source / f"{name}{ext}" for ext in (".json", ".jsonl") if (source / f"{name}{ext}").is_file()]
        if not files:
            raise PrepareError(f"timeclock: {source} has no {name}.json or {name}.jsonl")
        split = Split(name)
        for n, row in enumerate(read_records(files[0])):
            try:
                if isinstance(row, BadLine) or not isinstance(row, dict):
                    raise BadRowError(row.reason if isinstance(row, BadLine) else "not an object")
                rid, image, question, answer = record(row, n)
                split.records.append(llava(f"timeclock-{name}-{rid}", store.put(image), question, answer))
            except BadRowError as e:
                split.bad.append(f"{files[0].name} record {n}: {e}")
        out.append(split)
    return out


def prepare_timeclock(source: Path, store: ImageStore, **_) -> list[Split]:
    record = _clock_record(source)
    if any((source / f"train{ext}").is_file() for ext in (".json", ".jsonl")):
        return _json_splits(source, record, store)
    return _table_splits(source, {"train": "train", "test": "test"}, record, store, "timeclock")


TARGETS: dict[str, Callable[..., list[Split]]] = {
    "cub200": prepare_cub200, "pixmocount": prepare_pixmocount, "pathvqa": prepare_pathvqa,
    "textvqa": prepare_textvqa, "timeclock": prepare_timeclock,
}


# -- writing ---------------------------------------------------------------------------------------
def prepare(name: str, source: str | Path, out: str | Path, *, images: str | Path | None = None,
            seed: int = 0, verify_sha256: bool = False, echo=print) -> list[Split]:
    """Prepare target `name` from `source` into the data root `out`; returns the splits written."""
    if name not in TARGETS:
        raise PrepareError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    source, out = Path(source), Path(out)
    if not source.exists():
        raise PrepareError(f"{name}: source {source} does not exist")
    if (out / "world.json").is_file():
        raise PrepareError(f"{out} holds a world.json: training.data would read it as a world, not as tasks/")
    splits = TARGETS[name](source, ImageStore(out, name), seed=seed,
                           images=Path(images) if images else None, verify_sha256=verify_sha256)
    task_dir = out / "tasks" / name
    task_dir.mkdir(parents=True, exist_ok=True)
    for split in splits:
        if not split.records:
            raise PrepareError(split.summary(name) + ": nothing to write")
        (task_dir / f"{split.name}.json").write_text(json.dumps(split.records, indent=1, ensure_ascii=False))
        echo(split.summary(name))
    summary = {"task": name, "source": str(source.resolve()), "seed": seed,
               "splits": {s.name: {"records": len(s.records), "bad": s.bad} for s in splits}}
    (task_dir / "prepare.json").write_text(json.dumps(summary, indent=1))
    return splits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(TARGETS))
    ap.add_argument("--source", required=True, help="the target's public layout on disk (see the module doc)")
    ap.add_argument("--out", required=True, help="the data root to write (DIR/tasks/NAME, DIR/images/NAME)")
    ap.add_argument("--images", help="pixmocount: the folder of the images downloaded from image_url")
    ap.add_argument("--seed", type=int, default=0, help="cub200: the option draw's seed")
    ap.add_argument("--verify-sha256", action="store_true",
                    help="pixmocount: a downloaded image whose sha256 differs from image_sha256 is a bad row")
    args = ap.parse_args(argv)
    try:
        prepare(args.name, args.source, args.out, images=args.images, seed=args.seed,
                verify_sha256=args.verify_sha256)
    except (PrepareError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
