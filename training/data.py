"""Task data in LLaVA conversation JSON, resolved per task and turned into training batches.

A record: {"id", "image": path relative to an images root, "conversations": [{"from": "human", "value":
"<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}. The `<image>` placeholder is removed from the
text and the image goes to `training.chat.encode`, which renders the checkpoint's own chat template.
A multi-turn record gives one example per (human, gpt) pair, each with the record's image.

Where a task's files are (first match wins):
1. `data.tasks.NAME.train` / `.images` in the config (real data anywhere on disk);
2. `data.root` with a `world.json` (the embedded world's layout: tasks.NAME.train, images, pretrain);
3. the convention ROOT/tasks/NAME/train.json with images under `data.images` or ROOT/images.
`data.root: world` means `training.world.ensure_world()` (built on first use); `world:SIZE` passes the
world's size (`world:tiny` for tests).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .chat import answer_affixes, collate, encode
from .records import DataError, DataRoot, image_path, load_records, read_root, record_turns, task_paths

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TaskFiles:
    name: str
    train: Path
    images: Path | None
    test: Path | None = None


def resolve_root(data_cfg: dict) -> DataRoot:
    root = data_cfg.get("root")
    if root is None:
        return DataRoot(None, None)
    if root == "world" or root.startswith("world:"):
        from .world.build import ensure_world  # imported lazily: building the world is heavy and optional
        size = root.partition(":")[2]
        root = ensure_world(size=size) if size else ensure_world()
    return read_root(root)


def available_tasks(dr: DataRoot) -> list[str]:
    if dr.world is not None:
        return ([n for n, e in dr.world.get("tasks", {}).items() if e.get("train")]
                + (["pretrain"] if dr.world.get("pretrain") else []))
    if dr.root is not None and (dr.root / "tasks").is_dir():
        return sorted(p.name for p in (dr.root / "tasks").iterdir() if (p / "train.json").is_file())
    return []


def resolve_task(name: str, data_cfg: dict, dr: DataRoot) -> TaskFiles:
    """Where task `name`'s training file and images are (training.records.task_paths), checked; errors name
    the task and what was looked for."""
    over = (data_cfg.get("tasks") or {}).get(name) or {}
    entry = dr.world.get("tasks", {}).get(name) if dr.world is not None else None
    if entry is not None and not entry.get("train") and not over.get("train"):
        raise DataError(f"task {name!r} is evaluation only in {dr.root / 'world.json'} (kind "
                        f"{entry.get('kind')!r}): it has no training split")
    train, test, images = task_paths(name, data_cfg, dr)
    if train is None:
        known = available_tasks(dr)
        where = (f"data.root {dr.root} has {', '.join(known) or 'no tasks'}" if dr.root is not None
                 else "no data.root is set")
        raise DataError(f"unknown task {name!r}: {where}, and the config has no data.tasks.{name}.train")
    if not train.is_file():
        raise DataError(f"task {name!r}: training data file {train} does not exist")
    return TaskFiles(name, train.resolve(), images.resolve(), test.resolve() if test is not None else None)


# -- images ----------------------------------------------------------------------------------------
def open_image(images: Path | None, rel: str, where: str) -> Image.Image:
    p = image_path(images, rel, where)
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot open image {p} ({e})") from None


def check_images(records: list[dict], images: Path | None, source: str) -> None:
    """Every record's image stays under the root and exists, before any step is taken (a missing image
    would otherwise stop a stage part-way)."""
    for i, r in enumerate(records):
        if r.get("image"):
            where = f"{source} record {i} (id {r.get('id')!r})"
            if not image_path(images, r["image"], where).is_file():
                raise DataError(f"{where}: image {images / r['image']} does not exist")


class ConversationDataset(Dataset):
    """One item per (record, turn); encodes lazily, so large files cost only their JSON in memory."""

    def __init__(self, records: list[dict], processor, images: Path | None, source: str = "data"):
        self.records, self.processor, self.images, self.source = records, processor, images, source
        self.index = [(i, t) for i, r in enumerate(records) for t in range(len(r["conversations"]) // 2)]
        self.affixes = answer_affixes(processor)

    @classmethod
    def from_task(cls, task: TaskFiles, processor, max_examples: int | None = None) -> ConversationDataset:
        records = load_records(task.train, max_examples)
        check_images(records, task.images, str(task.train))
        return cls(records, processor, task.images, str(task.train))

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> list[int]:
        """Text tokens of each example's instruction and answer (what `train.group_by_length` sorts on; an
        image adds the same number of tokens to every example of a fixed-size world)."""
        texts = []
        for i, t in self.index:
            instruction, answer = record_turns(self.records[i], f"{self.source} record {i}")[t]
            texts.append(f"{instruction} {answer}")
        tok = getattr(self.processor, "tokenizer", self.processor)
        return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]

    def __getitem__(self, k: int):
        i, t = self.index[k]
        r = self.records[i]
        where = f"{self.source} record {i} (id {r.get('id')!r})"
        instruction, answer = record_turns(r, where)[t]
        image = open_image(self.images, r["image"], where) if r.get("image") else None
        return encode(self.processor, image, instruction, answer, affixes=self.affixes)


class Collator:
    """chat.collate, then labels = the answer and end-of-turn tokens, -100 elsewhere (a picklable callable)."""

    def __init__(self, family, pad_id: int):
        self.family, self.pad_id = family, pad_id

    def __call__(self, examples) -> dict:
        batch = collate(examples, self.family, self.pad_id, padding_side="right")
        keep = batch.pop("answer_mask") | batch.pop("eot_mask")
        batch["labels"] = torch.where(keep, batch["input_ids"], torch.full_like(batch["input_ids"], IGNORE_INDEX))
        return batch


# -- what probes and evaluation need from a run ----------------------------------------------------------
def benchmark_names(dr: DataRoot, eval_cfg: dict) -> list[str]:
    """The config's eval.benchmarks, else the world's targets, held-out and transfer sets (each in world order)."""
    if eval_cfg.get("benchmarks") is not None:
        return list(eval_cfg["benchmarks"])
    if dr.world is None:
        return []
    tasks = dr.world.get("tasks", {})

    def of_kind(kind):  # world order, or each task's "order" where given
        names = [n for n, t in tasks.items() if t.get("kind") == kind]
        return sorted(names, key=lambda n: (tasks[n].get("order") is None, tasks[n].get("order") or 0))
    return of_kind("target") + of_kind("heldout") + of_kind("transfer")
