"""RUN/run.json, the run manifest (docs/design.md): the one place that writes (atomically), reads and
validates it. Torch-free, so probes and analysis read runs without training's code.

    {"family", "recipe", "base", "tasks": [...], "config": {...},
     "stages": [{"index": 0, "name": "base", "task": null, "path": "stage-00-base"}, ...],
     "captions": {"path", "images"} | null,      the caption set the probes use
     "benchmarks": [names],                      what probes.evaluate scores by default
     "domains": {name: {"image", "text"}},       the 2x2 tags (training.domains)
     "task_files": {task: {"train", "test", "images"}},     what training resolved for every task its
                                                 data names (the run's own, the world's, data.tasks)
     "benchmark_files": {name: {"test", "images", "scorer", "split", "max_new_tokens", "chance", "source"}},
                                                 every benchmark the run's data defines, resolved
     "libraries": {"python", "torch", "transformers", ...}}  the versions the run was trained with

Keys are added, never removed or renamed. `task_files` / `benchmark_files` are what later commands need
so they never resolve training's data again; a run.json written before they existed still reads: they
are then worked out from its `config.data` (`upgrade`, torch-free, by training.records' rules).
"""
from __future__ import annotations

import json
import os
import platform
import re
import tempfile
from importlib import metadata
from pathlib import Path

from .records import DataError, DataRoot, cache_root, read_root, task_paths

RUN_JSON = "run.json"
RUN_KEYS = ("family", "recipe", "base", "tasks", "config", "stages")
STAGE_KEYS = ("index", "name", "task", "path")
SPLITS = ("target", "heldout")
# The libraries a run's numbers depend on (requirements/lock.txt pins them for make setup).
LIBRARIES = ("torch", "torchvision", "transformers", "tokenizers", "accelerate", "peft", "safetensors", "numpy",
             "pillow")


class ManifestError(ValueError):
    """A run.json that is missing, unreadable or breaks the contract; the message names the file."""


def library_versions() -> dict[str, str | None]:
    """The installed versions of LIBRARIES (None when absent) and Python's, for run.json and the demo."""
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), **{name: version(name) for name in LIBRARIES}}


def path_of(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RUN_JSON


# -- writing and reading ---------------------------------------------------------------------------
def write(run_dir: str | os.PathLike, manifest: dict) -> Path:
    """RUN/run.json, atomically: a reader sees the old file or the new one, never part of one."""
    path = path_of(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict:
    """A run.json file's object, unchecked beyond being a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file (is {path.parent} a run directory?)")
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot read ({e})") from None
    if not isinstance(man, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(man).__name__}")
    return man


def read_stages(run_dir: str | os.PathLike) -> dict:
    """RUN/run.json with its stages checked: a non-empty list of {index, name, path} (task optional), what
    every reader needs to find the checkpoints. A hand-written run.json may have only "stages"."""
    path = path_of(run_dir)
    man = load(path)
    stages = man.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ManifestError(f"{path}: needs a non-empty 'stages' list of {{index, name, task, path}}")
    for i, s in enumerate(stages):
        if not isinstance(s, dict) or not {"index", "name", "path"} <= set(s):
            raise ManifestError(f"{path}: stage {i} needs 'index', 'name' and 'path'")
    return man


def read_full(run_dir: str | os.PathLike) -> dict:
    """RUN/run.json holding every key of the contract (RUN_KEYS; each stage STAGE_KEYS; indices 0..n-1 in
    order): what analysis needs."""
    path = path_of(run_dir)
    man = load(path)
    missing = [k for k in RUN_KEYS if k not in man]
    if missing:
        raise ManifestError(f"{path}: lacks keys {missing} (needs {list(RUN_KEYS)})")
    stages = man["stages"]
    for s in stages:
        lacks = [k for k in STAGE_KEYS if k not in s]
        if lacks:
            raise ManifestError(f"{path}: stage {s} lacks keys {lacks}")
    if [s["index"] for s in stages] != list(range(len(stages))):
        raise ManifestError(f"{path}: stage indices are not 0..{len(stages) - 1} in order")
    return man


def run_captions(man: dict, root: str | os.PathLike) -> dict | None:
    """run.json's caption set {"path", "images"} with relative paths taken from the run directory; None
    when it names none."""
    caps = man.get("captions")
    if not (isinstance(caps, dict) and caps.get("path")):
        return None
    return {k: (str(Path(root) / v) if k in ("path", "images") and v and not Path(v).is_absolute() else v)
            for k, v in caps.items()}


# -- what the run's data defines -------------------------------------------------------------------
def names_task(benchmark: str, task: str) -> bool:
    """Whether a benchmark name refers to a trained task: equal, or one is the other plus a suffix
    after "_", "-", "." or " " (task "textvqa", benchmark "textvqa_val")."""
    if not task or not benchmark:
        return False
    return benchmark == task or any(a.startswith(b) and a[len(b)] in "_-. "
                                    for a, b in ((benchmark, task), (task, benchmark)) if len(a) > len(b))


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def data_files(dr: DataRoot, data_cfg: dict, run_tasks: list[str]) -> dict:
    """{"task_files", "benchmark_files"} of a run whose `data` config resolves to `dr`: every task the data
    names (the run's, the world's, ROOT/tasks/*, data.tasks) whose training file exists, placed by
    training.records.task_paths; and `benchmark_entries`."""
    files = {}
    for name in dict.fromkeys(list(run_tasks) + _named_tasks(dr, data_cfg)):
        train, test, images = task_paths(name, data_cfg, dr)
        if train is not None and train.is_file():
            files[name] = {"train": str(train.resolve()), "test": _str(test and test.resolve()),
                           "images": str(images.resolve())}
    return {"task_files": files, "benchmark_files": benchmark_entries(dr, files, list(run_tasks), data_cfg)}


def _named_tasks(dr: DataRoot, data_cfg: dict) -> list[str]:
    """The tasks a data config names besides the run's: the world's, ROOT/tasks/*, data.tasks."""
    names = list((dr.world or {}).get("tasks") or {}) + (["pretrain"] if (dr.world or {}).get("pretrain") else [])
    if dr.world is None and dr.root is not None and (dr.root / "tasks").is_dir():
        names += sorted(p.name for p in (dr.root / "tasks").iterdir() if (p / "train.json").is_file())
    return names + list(data_cfg.get("tasks") or {})


def benchmark_entries(dr: DataRoot, task_files: dict[str, dict], run_tasks: list[str],
                      data_cfg: dict) -> dict[str, dict]:
    """Every benchmark a run's data defines: each world.json task with a test file (its "scorer",
    "chance", "max_new_tokens"), then each run task whose resolved test file exists (config overrides
    applied; scorer from the world entry). `split`: target when it names a run task, else heldout."""
    if not data_cfg.get("root") and not data_cfg.get("tasks"):
        return {}
    entries = (dr.world or {}).get("tasks") or {}
    source = str(dr.root / "world.json") if dr.world is not None else "the run's config.data"
    out: dict[str, dict] = {}

    def add(name, test, images, e):
        out[name] = {"test": str(test), "images": _str(images), "scorer": e.get("scorer"),
                     "split": "target" if any(names_task(name, t) for t in run_tasks) else "heldout",
                     "max_new_tokens": e.get("max_new_tokens"), "chance": e.get("chance"), "source": source}
    for name, e in entries.items():
        if isinstance(e, dict) and e.get("test"):
            add(name, dr.path(e["test"]), dr.path(dr.world.get("images")), e)
    for task in run_tasks:       # the run's own tasks, with config overrides applied
        tf = task_files.get(task)
        if tf and tf["test"] is not None and Path(tf["test"]).is_file():
            add(task, tf["test"], tf["images"], entries.get(task) or {})
    return out


def task_files(man: dict) -> dict[str, dict]:
    """{task: {"train", "test", "images"}} of every task the run's data names (upgraded for an old run.json)."""
    return man["task_files"] if "task_files" in man else upgrade(man)["task_files"]


def benchmark_files(man: dict) -> dict[str, dict]:
    """{name: {"test", "images", "scorer", "split", "max_new_tokens", "chance", "source"}} (upgraded for
    an old run.json)."""
    return man["benchmark_files"] if "benchmark_files" in man else upgrade(man)["benchmark_files"]


# -- run.json files written before task_files / benchmark_files ----------------------------------------
def upgrade(man: dict) -> dict:
    """`man` with task_files and benchmark_files worked out from its config.data as training resolved it
    (without building anything: a world named `world[:SIZE]` must be in the cache)."""
    data_cfg = ((man.get("config") or {}).get("data")) or {}
    try:
        dr = _data_root(data_cfg.get("root"))
    except DataError as e:
        raise ManifestError(f"the run's data (config data.root {data_cfg.get('root')!r}) cannot be resolved: "
                            f"{e}") from None
    return man | data_files(dr, data_cfg, list(man.get("tasks") or []))


def _data_root(root: str | None) -> DataRoot:
    if root is None:
        return DataRoot(None, None)
    if root == "world" or root.startswith("world:"):
        return read_root(_cached_world(root.partition(":")[2] or "toy"))
    return read_root(root)


def _cached_world(size: str) -> Path:
    """The newest world of `size` (seed 0) in the cache: what `data.root: world[:SIZE]` names (the world
    is built as <cache>/world/vN for toy, vN-SIZE otherwise)."""
    pattern = re.compile(r"v(\d+)" + ("" if size == "toy" else "-" + re.escape(size)))
    found = [p.parent for p in (cache_root() / "world").glob("v*/world.json") if pattern.fullmatch(p.parent.name)]
    if not found:
        raise DataError(f"no {size} world in {cache_root() / 'world'}")
    return max(found, key=lambda p: int(pattern.fullmatch(p.name)[1]))
