"""Run configs (YAML + key=value overrides, every key checked) and LLaVA-JSON task data."""
import json

import pytest
import torch
from PIL import Image

from training.chat import encode
from training.config import CONFIG_DIR, ConfigError, load_config
from training.data import Collator, ConversationDataset, benchmark_names, resolve_root, resolve_task
from training.families import FAMILIES
from training.records import DataError, caption_set, load_records, record_turns

from .llava_fixture import COLOURS, TARGETS, write_llava_root


def test_overrides_are_yaml_typed_and_dotted():
    cfg = load_config("toy-tiny", ["train.lr=2e-4", "train.max_steps=3", "tasks=[cub200, timeclock]",
                                   "data.tasks.cub200.train=/x/train.json", "train.bf16=false", "seed=7",
                                   "train.max_grad_norm=null", "eval.benchmarks=a,b"])
    assert cfg["train"]["lr"] == 2e-4 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["max_steps"] == 3 and cfg["seed"] == 7 and cfg["train"]["bf16"] is False
    assert cfg["tasks"] == ["cub200", "timeclock"] and cfg["train"]["max_grad_norm"] is None
    assert cfg["data"]["tasks"]["cub200"] == {"train": "/x/train.json", "test": None, "images": None}
    assert cfg["eval"]["benchmarks"] == ["a", "b"]
    assert cfg["train"]["batch_size"] == 8  # from the file, untouched


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_configs_load_with_the_right_types(name):
    cfg = load_config(name)
    assert isinstance(cfg["train"]["lr"], float) and cfg["tasks"]
    if name in ("qwen2_5_vl_7b", "llava_onevision_7b", "llava_next_8b"):  # the paper's hyperparameters
        t = cfg["train"]
        assert (t["lr"], t["vision_lr"], t["epochs"], t["warmup_ratio"], t["scheduler"], t["weight_decay"]) == \
            (5e-6, 2e-6, 1, 0.03, "cosine", 0.0)
        assert t["bf16"] and cfg["save"] == "delta" and 16 <= t["batch_size"] * t["grad_accum"] * 8 <= 32
        assert cfg["tasks"] == TARGETS
        # only data roots: the prepared targets, and every benchmark of the study from a preset
        from probes.presets import names
        assert cfg["data"]["root"] and not cfg["data"]["tasks"]
        assert sorted(cfg["eval"]["presets"]) == sorted(names()) == sorted(cfg["eval"]["benchmarks"])


@pytest.mark.parametrize("overrides,match", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean train.lr"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["data.tasks.cub200.trian=/x"], "unknown config key 'data.tasks.cub200.trian'"),
    (["train.lr=fast"], "train.lr must be float"),
    (["save=partial"], "save must be one of full, delta"),
    (["train.lr"], "not key=value"),
    (["train.batch_size=0"], "train.batch_size must be at least 1"),
    (["eval.profile=fork"], "eval.profile must be one of study, lmms-eval"),
])
def test_bad_overrides_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("toy-tiny", overrides)


def test_unknown_key_in_a_file_names_file_and_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1e-4\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=rf"{p}: unknown config key 'train.warmup'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_records_single_and_multi_turn(tmp_path):
    rec = {"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "3"},
        {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"}]}
    assert record_turns(rec) == [("How many?", "3"), ("And the colour?", "red")]
    assert record_turns({"conversations": [{"from": "human", "value": "Q <image>"},
                                           {"from": "gpt", "value": "A"}]}) == [("Q", "A")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rec, {"id": "y", "conversations": [{"from": "gpt", "value": "A"},
                                                                  {"from": "human", "value": "Q"}]}]))
    with pytest.raises(DataError, match=rf"{bad} record 1 \(id 'y'\)"):
        load_records(bad)
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}: malformed JSON"):
        load_records(bad)


def test_dataset_encodes_through_chat_and_labels_only_answers(tmp_path, tiny_models):
    model, processor = tiny_models("qwen2_5_vl")
    root = write_llava_root(tmp_path, n=4)
    task = resolve_task("pathvqa", {"root": str(root)}, resolve_root({"root": str(root)}))
    ds = ConversationDataset.from_task(task, processor)
    records = load_records(task.train)
    assert len(ds) == 4 + 2  # records 1 and 3 have a second turn
    ex = ds[2]  # record 1, turn 1: "What colour is it?" -> its colour, with the record's image
    colour = records[1]["conversations"][3]["value"]
    img = Image.open(root / "images" / records[1]["image"]).convert("RGB")
    ref = encode(processor, img, "What colour is it?", colour)
    assert torch.equal(ex.input_ids, ref.input_ids) and colour in COLOURS
    batch = Collator(FAMILIES["qwen2_5_vl"], processor.tokenizer.pad_token_id)([ds[0], ds[2]])
    assert "answer_mask" not in batch and batch["labels"].shape == batch["input_ids"].shape
    for i, e in enumerate([ds[0], ds[2]]):
        want = torch.full((batch["labels"].shape[1],), -100)
        span = slice(e.prompt_len, e.prompt_len + e.answer_len + e.eot_len)
        want[span] = e.input_ids[span]
        assert torch.equal(batch["labels"][i], want)


def test_task_resolution_world_convention_and_overrides(tmp_path):
    conv = write_llava_root(tmp_path / "conv", n=2)
    world = write_llava_root(tmp_path / "world", n=2, world=True)
    dr = resolve_root({"root": str(conv)})
    t = resolve_task("textvqa", {"root": str(conv)}, dr)
    assert t.train == conv / "tasks/textvqa/train.json" and t.images == conv / "images"
    dr = resolve_root({"root": str(world)})
    assert dr.world is not None
    assert resolve_task("pretrain", {}, dr).train == world / "tasks/cub200/train.json"
    other = tmp_path / "real.json"
    other.write_text("[]")
    t = resolve_task("cub200", {"tasks": {"cub200": {"train": str(other), "images": str(tmp_path)}}}, dr)
    assert (t.train, t.images) == (other, tmp_path)
    assert caption_set(dr, {}) == {"path": str(world / "captions/lcs558k.json"), "images": str(world / "images")}
    assert benchmark_names(dr, {}) == TARGETS + ["colour"]
    assert benchmark_names(dr, {"benchmarks": ["x"]}) == ["x"]
    assert caption_set(resolve_root({"root": str(conv)}), {}) is None


def test_task_errors_name_the_task_and_file(tmp_path):
    root = write_llava_root(tmp_path, n=2, tasks=["cub200"])
    dr = resolve_root({"root": str(root)})
    with pytest.raises(DataError, match=rf"unknown task 'nosuch': data.root {root} has cub200"):
        resolve_task("nosuch", {}, dr)
    with pytest.raises(DataError, match=rf"task 'cub200': training data file {tmp_path}/gone.json does not exist"):
        resolve_task("cub200", {"tasks": {"cub200": {"train": str(tmp_path / "gone.json")}}}, dr)
    with pytest.raises(DataError, match="no data.root is set"):
        resolve_task("cub200", {}, resolve_root({}))
    with pytest.raises(DataError, match="is not a folder"):
        resolve_root({"root": str(tmp_path / "nope")})


def test_eval_presets_map_names_to_paths(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("eval:\n  presets: {ai2d: /data/ai2d, mmstar: /data/MMStar}\n  profile: study\n")
    cfg = load_config(p)
    assert cfg["eval"]["presets"] == {"ai2d": "/data/ai2d", "mmstar": "/data/MMStar"}
    assert cfg["eval"]["profile"] == "study" and load_config("toy-tiny")["eval"]["presets"] == {}
    p.write_text("eval:\n  presets: {ai2d: 3}\n")
    with pytest.raises(ConfigError, match="eval.presets must map benchmark names to local paths"):
        load_config(p)
