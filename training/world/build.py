"""Write the world to a folder, deterministically, and find or make the cached copy.

    WORLD/world.json                  what is where (see `describe_world`), written last
    WORLD/images/...                  every image, PNG; record paths are relative to this folder
    WORLD/captions/lcs558k.json       the caption corpus, LCS-558K format
    WORLD/tasks/NAME/{train,test}.json
    WORLD/tasks/pretrain/train.json   captions + every held-out task's train split, shuffled
    WORLD/tasks/pretrain_warmup/train.json  single-object "what shape" / "what colour" questions (the base
                                            model's warm-up)

Record i of a split is drawn from its own generator seeded by (seed, task, split, i), so a bigger world
extends a smaller one and the same seed gives byte-identical files. No image of any test split occurs in
any train split or in the captions (a colliding draw is redrawn).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from ..records import cache_root
from ..records import read_records as read_record_file
from . import tasks
from .registry import TASKS

VERSION = 3            # the world's files; 2 added the transfer tasks, 3 colour questions in the warm-up
PRETRAIN_VERSION = 2   # what the base model is pretrained on (captions, held-out train splits, warm-up): bump
                       # when those change, and every cached base model is rebuilt
WORLD_SIZES: dict[str, dict[str, int]] = {
    # records per split; "tiny" is for tests (generates in about a second)
    "tiny": dict(captions=48, target_train=24, target_test=12, heldout_train=24, heldout_test=12, transfer_test=12,
                 warmup=24),
    "toy": dict(captions=4000, target_train=1000, target_test=200, heldout_train=1500, heldout_test=200, transfer_test=200,
                warmup=4000),
}
CAPTIONS = "captions/lcs558k.json"
PRETRAIN = "tasks/pretrain/train.json"
PRETRAIN_WARMUP = "tasks/pretrain_warmup/train.json"


def world_dir_name(size: str = "toy", seed: int = 0) -> str:
    return f"v{VERSION}" + ("" if size == "toy" else f"-{size}") + (f"-seed{seed}" if seed else "")


def _sizes(size: str | dict) -> dict[str, int]:
    if isinstance(size, dict):
        missing = set(WORLD_SIZES["tiny"]) - set(size)
        if missing:
            raise ValueError(f"world size dict lacks {sorted(missing)}")
        return dict(size)
    try:
        return WORLD_SIZES[size]
    except KeyError:
        raise ValueError(f"unknown world size {size!r}; known: {', '.join(WORLD_SIZES)}") from None


def _record(rid: str, image: str, instruction: str, answer: str) -> dict:
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\n" + instruction}, {"from": "gpt", "value": answer}]}


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Writer:
    def __init__(self, root: Path, seed: int, total: int = 0):
        from tqdm.auto import tqdm

        self.root, self.seed = root, seed
        self.test_images: set[str] = set()
        self.redrawn = 0
        self.bar = tqdm(total=total, desc="world images", unit="img", leave=False, disable=total < 5000)

    def split(self, task: str, make, split: str, n: int, *, rel_dir: str, id_fmt: str) -> list[dict]:
        (self.root / "images" / rel_dir).mkdir(parents=True, exist_ok=True)
        out = []
        for i in range(n):
            for attempt in range(100):
                rng = random.Random(f"{self.seed}/{task}/{split}/{i}/{attempt}")
                s = make(rng)
                key = hashlib.sha1(s.image.tobytes()).hexdigest()
                if split == "test" or key not in self.test_images:
                    break
                self.redrawn += 1
            else:
                raise RuntimeError(f"{task}/{split}/{i}: every draw repeats a test image")
            if split == "test":
                self.test_images.add(key)
            rel = f"{rel_dir}/{id_fmt.format(i)}.png"
            (self.root / "images" / rel).write_bytes(_png(s.image))
            out.append(_record(f"{task}-{split}-{i:06d}" if task != "captions" else id_fmt.format(i), rel,
                               s.instruction, s.answer))
            self.bar.update()
        return out


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def write_world(out: str | os.PathLike, *, size: str | dict = "toy", seed: int = 0) -> Path:
    """Generate the world into `out` (which must not exist or be empty); returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; write the world into a new folder")
    n = _sizes(size)
    total = n["captions"] + n["warmup"] + sum(n[f"{spec.kind}_test"] + (n[f"{spec.kind}_train"] if spec.kind != "transfer" else 0)
                                              for spec in TASKS.values())
    w = _Writer(out, seed, total)
    splits: dict[str, dict[str, list]] = {name: {} for name in TASKS}
    for name, spec in TASKS.items():  # every test split first, so train draws can avoid test images
        splits[name]["test"] = w.split(name, spec.make, "test", n[f"{spec.kind}_test"],
                                       rel_dir=f"{name}/test", id_fmt="{:06d}")
    captions = w.split("captions", tasks.caption, "train", n["captions"], rel_dir="captions", id_fmt="{:09d}")
    warmup = w.split("pretrain_warmup", tasks.object_warmup, "train", n["warmup"], rel_dir="pretrain_warmup",
                     id_fmt="{:06d}")
    for name, spec in TASKS.items():
        if spec.kind != "transfer":  # evaluation only
            splits[name]["train"] = w.split(name, spec.make, "train", n[f"{spec.kind}_train"],
                                            rel_dir=f"{name}/train", id_fmt="{:06d}")
    _dump(out / CAPTIONS, captions)
    task_info = {}
    for name, spec in TASKS.items():
        for split, recs in splits[name].items():
            _dump(out / f"tasks/{name}/{split}.json", recs)
        task_info[name] = {"kind": spec.kind, "test": f"tasks/{name}/test.json",
                           "scorer": spec.scorer, "chance": round(spec.chance, 4),
                           "max_new_tokens": spec.max_new_tokens,
                           "n_train": len(splits[name].get("train", [])), "n_test": len(splits[name]["test"])}
        if "train" in splits[name]:
            task_info[name]["train"] = f"tasks/{name}/train.json"
        if spec.order is not None:
            task_info[name]["order"] = spec.order
    pretrain = captions + [r for name, spec in TASKS.items() if spec.kind == "heldout" for r in splits[name]["train"]]
    random.Random(f"{seed}/pretrain").shuffle(pretrain)
    _dump(out / PRETRAIN, pretrain)
    _dump(out / PRETRAIN_WARMUP, warmup)
    from .draw import IMAGE_SIZE
    _dump(out / "world.json", {
        "version": VERSION, "seed": seed, "size": size if isinstance(size, str) else "custom",
        "image_size": IMAGE_SIZE, "images": "images", "captions": CAPTIONS, "tasks": task_info,
        "pretrain": PRETRAIN, "pretrain_warmup": PRETRAIN_WARMUP,
        "n_captions": len(captions), "n_pretrain": len(pretrain),
        "redrawn_for_disjoint_splits": w.redrawn})
    w.bar.close()
    return out


def is_complete(path: str | os.PathLike) -> bool:
    p = Path(path) / "world.json"
    try:
        return json.loads(p.read_text()).get("version") == VERSION
    except (OSError, ValueError):
        return False


def ensure_world(root: str | os.PathLike | None = None, *, size: str = "toy", seed: int = 0) -> Path:
    """The world folder, generated once: into a temporary sibling, renamed when complete.

    Default location: `<cache>/world/vN` (`vN-tiny`, `vN-...-seedN` for other sizes and seeds; N = VERSION), where
    `<cache>` is `$LMM_DRIFT_CACHE` or `.cache` under the repository root. An existing complete world is
    reused as it is."""
    path = Path(root) if root is not None else cache_root() / "world" / world_dir_name(size, seed)
    if is_complete(path):
        return path
    if path.exists():  # an incomplete leftover that no writer owns any more (writers use temp siblings)
        raise FileExistsError(f"{path}: exists but holds no complete world (no valid world.json); remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_world(tmp, size=size, seed=seed)
        os.rename(tmp, path)
    except OSError:
        if is_complete(path):  # another process finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            return path
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_world(path: str | os.PathLike) -> dict:
    """world.json with paths resolved: adds "root" (Path) and absolute "images"."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: no complete world here (world.json missing or of another version)")
    info = json.loads((path / "world.json").read_text())
    info["root"] = path
    return info


def read_records(world: str | os.PathLike, rel: str) -> list[dict]:
    return read_record_file(Path(world) / rel)
