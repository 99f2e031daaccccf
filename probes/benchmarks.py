"""Benchmarks: test data in LLaVA conversation JSON plus a registered scorer (probes.scorers).

A benchmark is named, and its definition comes from (later sources override earlier ones):

1. the run's data, as training resolved it and recorded it in run.json's "benchmark_files"
   (training.manifest; worked out from `config.data` for a run.json older than that key): with a world.json,
   every entry of its "tasks" that has a "test" file (its "scorer", "chance" and optional
   "max_new_tokens"); and every task of the run with a test file (config `data.tasks.NAME.test`, or
   ROOT/tasks/NAME/test.json), its scorer from the world entry, else it must be registered below.
2. registry files (`--registry PATH`, YAML or JSON), relative paths from the file's folder:

       benchmarks:                     # the top-level key is optional
         docvqa_val: {test: docvqa/val.json, images: docvqa/images, scorer: anls, max_new_tokens: 32}
         ai2d: {test: ai2d/test.json, images: ai2d/images, scorer: mc_letter, split: heldout}

3. command-line flags: `--benchmark-file NAME=PATH` (with `--images`, `--scorer`, `--split` applying to
   every --benchmark-file of the command).

Records: {"id", "image": path under the images root (default: the test file's folder), "conversations":
[{"from": "human", "value": "<image>\\n question"}, {"from": "gpt", "value": "reference"}]} (JSON list or
JSONL). Each (human, gpt) turn is one scored item (with the record's image, no history, as training uses
it). References: the gpt turn, or a record's "answers" list (the ten VQA answers) for a one-turn record.
Every reference is checked by its scorer, and every image decoded, before any model runs; a bad record is
an error with --strict, else skipped and counted (`load`).

Split: `target` when the benchmark names a task the run trains (training.manifest.names_task: equal, or one
is the other plus a suffix after "_", "-", "." or " "), else `heldout`; a registry or --split value wins.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from training.manifest import SPLITS, ManifestError, benchmark_files, names_task
from training.records import BadLine, DataError, Sample, is_utf8, read_records, record_turns, resolve_image

from .scorers import SCORERS, get_scorer

DEFAULT_MAX_NEW_TOKENS = 16      # benchmark answers are short: a letter, a number, a word, a time
FILE_KEYS = ("test", "images", "scorer", "split", "max_new_tokens", "chance")


class BenchmarkError(ValueError):
    """A benchmark that cannot be resolved or read; the message names it and the file."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    test: Path
    images: Path | None = None          # image root; None = the test file's folder
    scorer: str | None = None
    split: str | None = None            # explicit; None = decided by the run's tasks (`split_of`)
    max_new_tokens: int | None = None   # None = the command's default
    chance: float | None = None         # as the source gives it (informational)
    source: str = ""                    # where it was defined, for messages


@dataclass(frozen=True)
class Item:
    sample: Sample                       # what the engine generates from
    references: list[str]
    record_id: str
    turn: int


@dataclass
class BenchmarkData:
    bench: Benchmark
    items: list[Item] = field(default_factory=list)
    n_skipped: int = 0                 # bad records skipped (not strict)
    first_skipped: str | None = None   # the first of them, named

    @property
    def samples(self) -> list[Sample]:
        return [it.sample for it in self.items]


# -- definitions -----------------------------------------------------------------------------------
def _check_definition(b: Benchmark) -> Benchmark:
    if b.scorer is not None and b.scorer not in SCORERS:
        raise BenchmarkError(f"benchmark {b.name!r} ({b.source}): unknown scorer {b.scorer!r}; "
                             f"registered scorers: {', '.join(sorted(SCORERS))}")
    if b.split is not None and b.split not in SPLITS:
        raise BenchmarkError(f"benchmark {b.name!r} ({b.source}): split {b.split!r}; allowed: {', '.join(SPLITS)}")
    if b.max_new_tokens is not None and (not isinstance(b.max_new_tokens, int) or b.max_new_tokens < 1):
        raise BenchmarkError(f"benchmark {b.name!r} ({b.source}): max_new_tokens must be a positive integer, "
                             f"got {b.max_new_tokens!r}")
    return b


def from_registry_file(path: str | os.PathLike) -> dict[str, Benchmark]:
    """Benchmarks defined in a YAML/JSON file: {name: {test, images, scorer, split, max_new_tokens, chance}}."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchmarkError(f"{path}: cannot read the benchmark registry ({e})") from None
    except yaml.YAMLError as e:
        raise BenchmarkError(f"{path}: not valid YAML/JSON ({e})") from None
    if isinstance(data, dict) and set(data) == {"benchmarks"}:
        data = data["benchmarks"]
    if not isinstance(data, dict) or not data:
        raise BenchmarkError(f"{path}: expected a mapping of benchmark name -> {{test, scorer, ...}}")
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict):
            raise BenchmarkError(f"{path}: benchmark {name!r} must be a mapping with keys {', '.join(FILE_KEYS)}")
        unknown = sorted(set(entry) - set(FILE_KEYS))
        if unknown:
            raise BenchmarkError(f"{path}: benchmark {name!r}: unknown keys {unknown} (known: {', '.join(FILE_KEYS)})")
        for key in ("test", "scorer"):
            if not entry.get(key):
                raise BenchmarkError(f"{path}: benchmark {name!r} needs {key!r}")

        def rel(v):
            return None if v is None else (Path(v) if Path(v).is_absolute() else path.parent / v)
        out[str(name)] = _check_definition(Benchmark(
            str(name), rel(entry["test"]), rel(entry.get("images")), entry["scorer"], entry.get("split"),
            entry.get("max_new_tokens"), entry.get("chance"), str(path)))
    return out


def from_cli(files: Iterable[str], images: str | None = None, scorer: str | None = None,
             split: str | None = None) -> dict[str, Benchmark]:
    """--benchmark-file NAME=PATH entries (the shared --images / --scorer / --split apply to each)."""
    out = {}
    for item in files or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BenchmarkError(f"--benchmark-file {item!r}: expected NAME=PATH")
        if not scorer:
            raise BenchmarkError(f"--benchmark-file {item}: give --scorer ({', '.join(sorted(SCORERS))})")
        out[name] = _check_definition(Benchmark(name, Path(path), Path(images) if images else None, scorer, split,
                                                source="--benchmark-file"))
    return out


def from_world(manifest: dict) -> dict[str, Benchmark]:
    """The benchmarks of a run's data as training resolved them (run.json "benchmark_files"; see the module
    docstring); {} for a run without config.data."""
    try:
        files = benchmark_files(manifest)
    except ManifestError as e:
        raise BenchmarkError(str(e)) from None
    out = {name: Benchmark(name, Path(e["test"]), Path(e["images"]) if e["images"] else None, e["scorer"],
                           e["split"], e["max_new_tokens"], e["chance"], e["source"]) for name, e in files.items()}
    for b in out.values():
        _check_definition(b)
    return out


def run_tasks(manifest: dict) -> list[str]:
    return [t for t in manifest.get("tasks") or []] + [s.get("task") for s in manifest.get("stages") or []
                                                       if s.get("task")]


def split_of(bench: Benchmark, tasks: list[str]) -> str:
    """`target` when the benchmark names a task the run trains, else `heldout`; an explicit split wins."""
    if bench.split:
        return bench.split
    return "target" if any(names_task(bench.name, t) for t in tasks) else "heldout"


def resolve(names: list[str] | None, manifest: dict, local: dict[str, Benchmark]) -> list[Benchmark]:
    """The benchmarks to score: `names`, else run.json's "benchmarks" then every locally defined one.
    `local` (registry files, then CLI) overrides the world's definitions. Unknown names are an error that
    lists the valid ones."""
    wanted = list(names) if names else list(dict.fromkeys(list(manifest.get("benchmarks") or []) + list(local)))
    world: dict[str, Benchmark] = {}
    world_error = None
    if any(n not in local for n in wanted) or not wanted:
        try:
            world = from_world(manifest)
        except BenchmarkError as e:
            world_error = str(e)
    known = world | local
    if not wanted:
        raise BenchmarkError("no benchmarks to score: run.json names none; pass --benchmarks NAMES "
                             f"(valid: {', '.join(known) or 'none'}) or --benchmark-file NAME=PATH --scorer S"
                             + (f" ({world_error})" if world_error else ""))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise BenchmarkError(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(known) or 'none'}"
                             + (f" ({world_error})" if world_error else "")
                             + "; define others with --benchmark-file NAME=PATH --scorer S or --registry FILE")
    out = []
    for n in wanted:
        b = known[n]
        if not b.scorer:
            raise BenchmarkError(f"benchmark {n!r} (test file {b.test}, from {b.source}) has no scorer; give it one "
                                 f"with --registry FILE or --benchmark-file {n}={b.test} --scorer S "
                                 f"({', '.join(sorted(SCORERS))})")
        out.append(b)
    return out


# -- data ------------------------------------------------------------------------------------------
def load(bench: Benchmark, limit: int | None = None, strict: bool = True) -> BenchmarkData:
    """The first `limit` records (all when None) as scored items; every image must exist and decode and every
    reference must be readable by the scorer, so bad data is found before any model runs.

    A bad record (a JSONL line that is not JSON or UTF-8, text that is not UTF-8, a malformed conversation,
    an empty answers list, a missing, unreadable or escaping image, a reference the scorer cannot read):
    strict, an error naming it (and how many of the selected records are bad); not strict, it is skipped
    and counted (`n_skipped`, `first_skipped`) and `limit` counts good records (the first N good ones)."""
    where = f"benchmark {bench.name!r} ({bench.test})"
    if not bench.test.is_file():
        raise BenchmarkError(f"{where}: test file does not exist (defined in {bench.source})")
    try:
        records = read_records(bench.test)
    except DataError as e:
        raise BenchmarkError(f"benchmark {bench.name!r}: {e}") from None
    if not records:
        raise BenchmarkError(f"{where}: no records")
    score = get_scorer(bench.scorer)
    root = bench.images if bench.images is not None else bench.test.parent
    data = BenchmarkData(bench)
    bad: list[str] = []
    good = 0
    for i, r in enumerate(records):
        if limit is not None and (i if strict else good) >= limit:
            break
        try:
            data.items += _record_items(bench, r, i, root, score)
            good += 1
        except (BenchmarkError, DataError) as e:
            msg = str(e)
            bad.append(msg if msg.startswith("benchmark ") else f"benchmark {bench.name!r}: {msg}")
    if bad and strict:
        raise BenchmarkError(bad[0] if len(bad) == 1 else
                             f"{where}: {len(bad)} bad records among those selected; the first: {bad[0]}")
    if not data.items:
        raise BenchmarkError(f"{where}: no usable records ({len(bad)} bad; the first: {bad[0] if bad else '-'})")
    data.n_skipped, data.first_skipped = len(bad), (bad[0] if bad else None)
    return data


def _record_items(bench: Benchmark, r, i: int, root: Path, score) -> list[Item]:
    """The scored items of record i; raises (naming it) for anything that makes the record unusable."""
    where = f"benchmark {bench.name!r} ({bench.test})"
    if isinstance(r, BadLine):
        raise BenchmarkError(f"{where}: {r.reason}")
    turns = record_turns(r, f"{bench.test} record {i}")
    rid = str(r.get("id", i))
    answers = r.get("answers")
    if answers is not None:
        if len(turns) != 1:
            raise BenchmarkError(f"{where}: record {rid!r} has an 'answers' list and {len(turns)} turns; "
                                 "'answers' belongs to one-turn records")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int)) for a in answers):
            raise BenchmarkError(f"{where}: record {rid!r}: 'answers' must be a non-empty list of strings")
    texts = [rid, *(t for turn in turns for t in turn), *(a for a in answers or [] if isinstance(a, str))]
    if isinstance(r.get("image"), str):
        texts.append(r["image"])
    if not all(is_utf8(t) for t in texts):
        raise BenchmarkError(f"{where}: record {rid!r} has text that is not valid UTF-8")
    image = None
    if r.get("image"):
        image = resolve_image(r["image"], root, rid, str(bench.test))
        try:
            Sample(rid, "", None, image).open_image()     # decodes it: an unreadable image is found now
        except DataError as e:
            raise BenchmarkError(f"{where}: record {rid!r}: cannot read image {r['image']!r} ({e.__cause__})") from None
    items = []
    for t, (instruction, answer) in enumerate(turns):
        refs = [str(a) for a in answers] if answers is not None else [answer]
        try:
            score("", refs)                 # a reference the scorer cannot read fails now
        except ValueError as e:
            raise BenchmarkError(f"{where}: record {rid!r}: {e}") from None
        sid = f"{bench.name}/{rid}" + (f"#{t}" if len(turns) > 1 else "")
        # image_ref keys the engine's encode cache: the resolved path, unique across benchmarks
        items.append(Item(Sample(sid, instruction, None, image, image or ""), refs, rid, t))
    return items
