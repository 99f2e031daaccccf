"""run.json (training.manifest): written atomically, read and validated in one place with errors that name
the file; the resolved data entries later commands use; and run.json files older than those entries."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from training import manifest as M
from training.data import resolve_root, resolve_task

from .llava_fixture import TARGETS, write_llava_root

ROOT = Path(__file__).resolve().parents[1]
STAGES = [{"index": 0, "name": "base", "task": None, "path": "stage-00-base"},
          {"index": 1, "name": "cub200", "task": "cub200", "path": "stage-01-cub200"}]


def manifest_for(root: Path, data_cfg: dict, tasks=("pixmocount", "cub200")) -> dict:
    """run.json as training.run writes it (without the keys it reads from the model and method)."""
    man = {"family": "qwen2_5_vl", "recipe": "full", "base": "b", "tasks": list(tasks),
           "config": {"data": data_cfg}, "stages": STAGES}
    return man | M.data_files(resolve_root(data_cfg), data_cfg, list(tasks))


def test_round_trip_is_atomic_and_validated(tmp_path):
    man = {"family": "f", "recipe": "r", "base": "b", "tasks": ["cub200"], "config": {}, "stages": STAGES,
           "captions": {"path": "caps.json", "images": None}}
    path = M.write(tmp_path / "run", man)
    assert path == tmp_path / "run" / "run.json" and [p.name for p in path.parent.iterdir()] == ["run.json"]
    assert M.read_stages(tmp_path / "run") == M.read_full(tmp_path / "run") == man
    assert M.run_captions(man, tmp_path / "run") == {"path": str(tmp_path / "run" / "caps.json"), "images": None}
    assert M.run_captions({"captions": None}, tmp_path) is None


@pytest.mark.parametrize("text, reader, message", [
    (None, M.read_stages, r"run.json: no such file \(is .* a run directory\?\)"),
    ("{oops", M.read_stages, r"run.json: malformed JSON at line 1 column 2"),
    ("[1, 2]", M.read_stages, r"run.json: expected a JSON object, found list"),
    ('{"stages": []}', M.read_stages, r"run.json: needs a non-empty 'stages' list"),
    ('{"stages": [{"index": 0, "name": "base"}]}', M.read_stages, r"run.json: stage 0 needs 'index', 'name' and 'path'"),
    ('{"stages": [{"index": 0, "name": "b", "path": "p"}]}', M.read_full, r"run.json: lacks keys \['family'"),
])
def test_errors_name_the_file(tmp_path, text, reader, message):
    if text is not None:
        (tmp_path / "run.json").write_text(text)
    with pytest.raises(M.ManifestError, match=f"{tmp_path}/" + message):
        reader(tmp_path)


def test_full_contract_checks_stage_keys_and_order(tmp_path):
    base = {"family": "f", "recipe": "r", "base": "b", "tasks": [], "config": {}}
    M.write(tmp_path, base | {"stages": [dict(STAGES[0], index=1)]})
    with pytest.raises(M.ManifestError, match=f"{tmp_path}/run.json: stage indices are not 0..0 in order"):
        M.read_full(tmp_path)
    M.write(tmp_path, base | {"stages": [{"index": 0, "name": "b", "path": "p"}]})
    with pytest.raises(M.ManifestError, match=r"stage .* lacks keys \['task'\]"):
        M.read_full(tmp_path)
    assert M.read_stages(tmp_path)["stages"][0]["path"] == "p"    # what discovery needs is there


def test_data_entries_are_what_training_resolved(tmp_path):
    root = write_llava_root(tmp_path / "w", n=2, world=True)
    other = tmp_path / "other_test.json"
    shutil.copy(root / "tasks/textvqa/test.json", other)
    data = {"root": str(root), "tasks": {"pixmocount": {"test": str(other), "images": str(root / "images")}}}
    man = manifest_for(root, data)
    dr = resolve_root(data)
    assert sorted(man["task_files"]) == sorted(TARGETS + ["pretrain"])       # "colour" has no training split
    for name, entry in man["task_files"].items():
        tf = resolve_task(name, data, dr)
        assert entry == {"train": str(tf.train), "test": tf.test and str(tf.test), "images": str(tf.images)}
    bench = man["benchmark_files"]
    assert list(bench) == TARGETS + ["colour"]
    assert bench["pixmocount"]["test"] == str(other.resolve())               # the config's override wins
    assert bench["colour"] == {"test": str(root / "tasks/cub200/test.json"), "images": str(root / "images"),
                               "scorer": "exact", "split": "heldout", "max_new_tokens": None, "chance": 0.25,
                               "source": str(root / "world.json")}
    assert [n for n, b in bench.items() if b["split"] == "target"] == ["cub200", "pixmocount"]
    assert M.data_files(resolve_root({}), {}, ["cub200"]) == {"task_files": {}, "benchmark_files": {}}


def _old(man: dict) -> dict:
    return {k: v for k, v in man.items() if k not in ("task_files", "benchmark_files")}


def test_an_old_run_json_reads_as_training_resolved_it(tmp_path):
    root = write_llava_root(tmp_path / "w", n=2, world=True)
    man = manifest_for(root, {"root": str(root), "tasks": {}})
    old = _old(man)
    assert M.task_files(old) == man["task_files"] and M.benchmark_files(old) == man["benchmark_files"]
    assert M.task_files(man) is man["task_files"]                            # recorded: nothing is resolved
    missing = _old(manifest_for(root, {"root": str(root)})) | {"config": {"data": {"root": str(tmp_path / "gone")}}}
    with pytest.raises(M.ManifestError, match="config data.root .*gone.* cannot be resolved"):
        M.benchmark_files(missing)


def test_an_old_world_run_finds_its_world_in_the_cache_without_building_it(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    world = write_llava_root(cache / "world" / "v2-tiny", n=2, world=True)
    write_llava_root(cache / "world" / "v1-tiny", n=1, world=True)          # an older world of that size
    monkeypatch.setenv("LMM_DRIFT_CACHE", str(cache))
    new = manifest_for(world, {"root": str(world)})
    old = _old(new) | {"config": {"data": {"root": "world:tiny"}}}
    assert M.task_files(old) == new["task_files"] and M.benchmark_files(old) == new["benchmark_files"]
    with pytest.raises(M.ManifestError, match="no toy world in"):
        M.task_files(old | {"config": {"data": {"root": "world"}}})


def test_probes_read_old_and_new_run_json_alike_without_training_data(tmp_path, monkeypatch):
    """benchmarks and signatures take the recorded entries, and for an old run.json the manifest's upgrade;
    neither imports training.data (checked in a fresh interpreter)."""
    root = write_llava_root(tmp_path / "w", n=2, world=True)
    new = manifest_for(root, {"root": str(root), "tasks": {}})
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(_old(new)))
    code = (
        "import json, sys\n"
        "from probes.benchmarks import from_world\n"
        "from probes.signatures import task_files\n"
        f"new, old = (json.load(open('{tmp_path}/' + n)) for n in ('new.json', 'old.json'))\n"
        "assert from_world(new) == from_world(old) and len(from_world(old)) == 6\n"
        "assert task_files(new) == task_files(old) and list(task_files(old)) == ['pixmocount', 'cub200']\n"
        "assert from_world(old)['cub200'].split == 'target' and from_world(old)['colour'].split == 'heldout'\n"
        "bad = [m for m in ('training.data', 'torch') if m in sys.modules]\n"
        "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
