"""The embedded world: deterministic, LCS-558K-shaped captions, disjoint splits, well-formed answers,
natural number base rate, tokenizers that keep numbers ordinary, loadable init/base checkpoints."""
import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from PIL import Image

from training.tokenizer import NUMBER_WORDS
from training.world import draw, scenes, tasks
from training.world.build import VERSION, ensure_world, load_world, read_records, write_world
from training.world.registry import HELDOUT_TASKS, SCORERS, TARGET_TASKS, TASKS, TRANSFER_TASKS

from .conftest import FAMILY_NAMES


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world") / "w", size="tiny", seed=0)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _all_split_files(info) -> list[str]:
    """Every record file; the mixed pretraining file (which repeats records) last."""
    return ([info["captions"]] + [t[s] for t in info["tasks"].values() for s in ("train", "test") if s in t]
            + [info["pretrain_warmup"], info["pretrain"]])


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(world, tmp_path):
    again = write_world(tmp_path / "again", size="tiny", seed=0)
    a, b = _tree_digest(world), _tree_digest(again)
    assert len(a) > 400 and a == b
    other = _tree_digest(write_world(tmp_path / "other", size="tiny", seed=1))
    assert other.keys() == a.keys()
    assert sum(other[k] != a[k] for k in a) > 0.9 * len(a)


def test_world_json_layout(world):
    info = load_world(world)
    assert info["images"] == "images" and info["captions"] == "captions/lcs558k.json"
    assert info["pretrain"] == "tasks/pretrain/train.json"
    assert info["pretrain_warmup"] == "tasks/pretrain_warmup/train.json"
    assert list(info["tasks"]) == list(TASKS)
    assert TARGET_TASKS == ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]
    assert len(HELDOUT_TASKS) >= 6 and not set(HELDOUT_TASKS) & set(TARGET_TASKS)
    assert TRANSFER_TASKS == ["pixmocount_tissue", "textvqa_shapes"]
    for name, t in info["tasks"].items():
        assert t["kind"] == ("target" if name in TARGET_TASKS else "transfer" if name in TRANSFER_TASKS else "heldout")
        assert t["test"] == f"tasks/{name}/test.json"
        assert t.get("train") == (None if t["kind"] == "transfer" else f"tasks/{name}/train.json")
        assert t["scorer"] in SCORERS and 0 < t["chance"] < 100
        assert ("order" in t) == (t["kind"] == "target")
    assert [info["tasks"][n]["order"] for n in TARGET_TASKS] == list(range(5))


def _check_lcs_record(rec, images: Path):
    assert set(rec) == {"id", "image", "conversations"}
    assert isinstance(rec["id"], str) and isinstance(rec["image"], str) and not rec["image"].startswith("/")
    human, gpt = rec["conversations"]
    assert set(human) == {"from", "value"} and set(gpt) == {"from", "value"}
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
    assert gpt["value"] and gpt["value"] == gpt["value"].strip() and "<image>" not in gpt["value"]
    with Image.open(images / rec["image"]) as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (draw.IMAGE_SIZE, draw.IMAGE_SIZE)


def test_captions_are_in_the_exact_lcs558k_format(world):
    info = load_world(world)
    caps = read_records(world, info["captions"])
    assert isinstance(caps, list) and len(caps) == 48
    for rec in caps:
        _check_lcs_record(rec, world / "images")
        assert re.fullmatch(r"\d{9}", rec["id"])
        assert rec["conversations"][0]["value"].split("\n", 1)[1] in tasks.CAPTION_INSTRUCTIONS
        cap = rec["conversations"][1]["value"]
        assert cap == cap.lower() and not cap.endswith(".")  # BLIP-style captions, as in LCS-558K
    assert len({r["conversations"][0]["value"] for r in caps}) >= 5


def test_every_split_uses_the_same_record_format_and_ids_are_unique(world):
    info = load_world(world)
    ids = []
    for rel in _all_split_files(info)[:-1]:
        for rec in read_records(world, rel):
            _check_lcs_record(rec, world / "images")
            ids.append(rec["id"])
    assert len(ids) == len(set(ids))


def test_pretraining_is_captions_and_heldout_train_splits_only(world):
    info = load_world(world)
    pre = read_records(world, info["pretrain"])
    expected = read_records(world, info["captions"]) + [
        r for n in HELDOUT_TASKS for r in read_records(world, info["tasks"][n]["train"])]
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(pre, key=key) == sorted(expected, key=key)
    assert not any(r["id"].split("-")[0] in TARGET_TASKS for r in pre)
    warm = read_records(world, info["pretrain_warmup"])
    questions = {"What shape is the object?": set(draw.SHAPES), "What colour is the object?": set(draw.COLOURS)}
    asked = {q: 0 for q in questions}
    for r in warm:  # lone objects, asked their shape or their colour (both kinds in every world)
        q = r["conversations"][0]["value"].split("\n")[1]
        assert r["conversations"][1]["value"] in questions[q], r
        asked[q] += 1
    assert min(asked.values()) >= len(warm) // 4, asked


def test_no_test_image_occurs_in_any_train_split_or_the_captions(world):
    info = load_world(world)

    def pixels(rel):
        return {hashlib.sha1(Image.open(world / "images" / r["image"]).convert("RGB").tobytes()).hexdigest()
                for r in read_records(world, rel)}
    test = set().union(*(pixels(t["test"]) for t in info["tasks"].values()))
    train = set().union(pixels(info["captions"]), *(pixels(t["train"]) for t in info["tasks"].values() if "train" in t))
    assert test and train and not test & train


def _qa(world, task):
    info = load_world(world)
    recs = [r for s in ("train", "test") if s in info["tasks"][task] for r in read_records(world, info["tasks"][task][s])]
    return [(r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in recs]


def test_target_answers_are_well_formed(world):
    for q, a in _qa(world, "cub200"):
        letters = re.findall(r"^([A-Z])\. (.+)$", q, flags=re.M)
        assert [x for x, _ in letters] == list("ABCDEF")[:tasks.BIRD_OPTIONS]
        assert re.fullmatch(r"[A-Z]", a) and a in dict(letters)
        assert dict(letters)[a] in tasks.BIRD_NAMES
    for _, a in _qa(world, "pixmocount"):
        assert re.fullmatch(r"[1-9]", a)
    for q, a in _qa(world, "pathvqa"):
        allowed = {"yes", "no"} if "lesion" in q else set(draw.PATTERNS) if "pattern" in q else set(draw.STAINS)
        assert a in allowed
    for _, a in _qa(world, "textvqa"):
        assert a in tasks.WORDS or (re.fullmatch(r"\d{1,2}", a) and str(int(a)) == a)
    for task, target in [("pixmocount_tissue", "pixmocount"), ("textvqa_shapes", "textvqa")]:
        # the target's question and answers, about other pictures: image-OOD/text-ID
        assert {q.split("\n")[-1] for q, _ in _qa(world, task)} == {q.split("\n")[-1] for q, _ in _qa(world, target)}
        assert all(a in {a for _, a in _qa(world, target)} | set(tasks.WORDS) | {str(i) for i in range(100)}
                   for _, a in _qa(world, task))
    for _, a in _qa(world, "timeclock"):
        m = re.fullmatch(r"(1[0-2]|[1-9]):([0-5]\d)", a)
        assert m and int(m.group(2)) % tasks.MINUTE_STEP == 0


def test_heldout_answers_are_well_formed(world):
    allowed = {"colour": set(draw.COLOURS), "shape": set(draw.SHAPES), "position": set(scenes.POSITIONS.values()),
               "size": {"small", "large"}, "presence": {"yes", "no"}, "caption_match": set("ABCD"),
               "background": set(draw.BACKGROUNDS), "scene": {"shapes", "tissue", "a bird", "a clock", "a sign"}}
    assert set(allowed) == set(HELDOUT_TASKS)
    for task, ok in allowed.items():
        answers = [a for _, a in _qa(world, task)]
        assert set(answers) <= ok, task
        if task in ("presence", "size"):
            assert len(set(answers)) == 2, task  # both answers occur


def test_caption_match_answer_is_the_description_of_the_drawn_object():
    for i in range(200):
        s = tasks.caption_match(random.Random(f"cm{i}"))
        options = dict(re.findall(r"^([A-D])\. (.+)$", s.instruction, flags=re.M))
        assert len(set(options.values())) == 4
        # redraw the same scene: the same seed gives the same first draw of sample_scene
        o = scenes.sample_scene(random.Random(f"cm{i}"), 1).objects[0]
        assert options[s.answer] == f"a {o.size} {o.colour} {o.shape} at the {o.position}"


def _has_number(text: str) -> bool:
    words = set(NUMBER_WORDS)
    return bool(re.search(r"\d", text)) or any(w in words for w in re.findall(r"[a-z]+", text.lower()))


def test_numbers_occur_in_a_minority_of_captions_at_a_natural_rate():
    caps = [tasks.caption(random.Random(f"rate{i}")).answer for i in range(3000)]
    rate = sum(map(_has_number, caps)) / len(caps)
    digits = sum(bool(re.search(r"\d", c)) for c in caps) / len(caps)
    # LCS-558K-like: a minority of captions mention a number (stated range 5-25 %), some as digits
    assert 0.05 <= rate <= 0.25, rate
    assert 0.01 <= digits < rate


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_world_tokenizer_keeps_digits_and_number_words_as_ordinary_tokens(family, world):
    from training.world.tokenizers import world_tokenizer
    tok = world_tokenizer(family, world)
    special = set(tok.all_special_tokens)

    def pieces(text):
        return [t for t in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
                if t.strip("Ġ▁ ")]
    assert pieces("0123456789") == list("0123456789")
    for w in ["two", "three", "seven", "twenty", "hundred"]:
        for text in (w, f"a {w}", w.capitalize()):
            assert [p.strip("Ġ▁") for p in pieces(text)][-1] == text.split()[-1], (family, text)
    assert not any(p in special for p in pieces("there are 12 red circles and two squares at 3:45"))
    assert tok.decode(tok("there are 12 red circles at 3:45", add_special_tokens=False)["input_ids"]).strip() == \
        "there are 12 red circles at 3:45"
    assert tok.chat_template


def test_ensure_world_generates_once_atomically_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("LMM_DRIFT_CACHE", str(tmp_path / "cache"))
    path = ensure_world(size="tiny")
    assert path == tmp_path / "cache" / "world" / f"v{VERSION}-tiny"
    stamp = (path / "world.json").stat().st_mtime_ns
    assert ensure_world(size="tiny") == path and (path / "world.json").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [f"v{VERSION}-tiny"]  # no temporary folder left behind
    explicit = ensure_world(tmp_path / "mine", size="tiny")
    assert json.loads((explicit / "world.json").read_text())["size"] == "tiny"


def test_ensure_world_refuses_an_incomplete_folder(tmp_path):
    (tmp_path / "half" / "images").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="half.*no complete world"):
        ensure_world(tmp_path / "half", size="tiny")


# -- base models ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """base_checkpoint('qwen2_5_vl', 'tiny') built in a private cache (world + pretraining through the loop)."""
    from training.run import run_in_processes
    from training.world.base import base_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMM_DRIFT_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = base_checkpoint("qwen2_5_vl", "tiny", train=run_in_processes)
        stamp = (path / "model.safetensors").stat().st_mtime_ns
        assert base_checkpoint("qwen2_5_vl", "tiny", train=run_in_processes) == path  # cached: not built again
        assert (path / "model.safetensors").stat().st_mtime_ns == stamp
        yield path


def test_tiny_base_checkpoint_loads_with_auto_classes_and_was_trained(tiny_base):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.chat import encode
    from training.world.tokenizers import world_tokenizer
    model = AutoModelForImageTextToText.from_pretrained(tiny_base)
    processor = AutoProcessor.from_pretrained(tiny_base)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    summary = json.loads((tiny_base / "world_base.json").read_text())
    world = Path(summary["world"])
    assert processor.tokenizer.get_vocab() == world_tokenizer("qwen2_5_vl", world).get_vocab()
    rec = read_records(world, "captions/lcs558k.json")[0]
    with Image.open(world / "images" / rec["image"]) as im:
        ex = encode(processor, im.convert("RGB"), rec["conversations"][0]["value"][len("<image>\n"):],
                    rec["conversations"][1]["value"])
    assert ex.image_inputs["image_grid_thw"].tolist() == [[1, 12, 12]]  # 48 px, patch 4
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ex.input_ids == image_token).sum() == 9  # merge 4x4: 9 image tokens
    with torch.no_grad():
        logits = model(input_ids=ex.input_ids[None], **ex.image_inputs).logits
    assert torch.isfinite(logits).all()
    # pretrained through training.run: the loss fell, and the quick check covers every task
    assert summary["steps"] > 0 and summary["last_loss"] < summary["first_loss"]
    assert set(TASKS) <= set(summary["quick_check"])
    log = [json.loads(line) for line in (tiny_base / "pretrain_log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "stage_end" and log[-1]["task"] == "pretrain"


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next"])
def test_init_checkpoint_of_the_llava_families_loads_with_auto_classes(family, world, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from training.chat import encode
    from training.world.models import init_checkpoint
    path = init_checkpoint(family, "tiny", tmp_path / "init", world=world)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    ex = encode(processor, Image.new("RGB", (48, 48), (200, 30, 30)), "Describe the image concisely.", "a red square")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (ex.input_ids == image_token).sum() == 21  # 3x3 base view + 3x3 crop + 3 row separators
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ex.input_ids[None], **ex.image_inputs).logits).all()


def test_quick_check_equals_greedy_generation(tiny_base):
    """greedy_exact (teacher-forced) must agree with model.generate: True on the model's own greedy answers,
    False once one answer token is changed."""
    import torch

    from training.chat import encode
    from training.checkpoints import load_model, load_processor
    from training.world.quickcheck import greedy_exact
    model, processor = load_model(tiny_base), load_processor(tiny_base)
    tok = processor.tokenizer
    world = Path(json.loads((tiny_base / "world_base.json").read_text())["world"])
    own, changed = [], []
    for task in ["colour", "presence", "pixmocount", "timeclock"]:
        for rec in read_records(world, f"tasks/{task}/test.json")[:6]:
            with Image.open(world / "images" / rec["image"]) as im:
                image = im.convert("RGB")
            instruction = rec["conversations"][0]["value"][len("<image>\n"):]
            prompt = encode(processor, image, instruction)
            with torch.no_grad():  # mm_token_type_ids too: without them Qwen2.5-VL's rope skips the image grid
                gen = model.generate(input_ids=prompt.input_ids[None], attention_mask=torch.ones_like(
                    prompt.input_ids[None]), **prompt.image_inputs, max_new_tokens=6, do_sample=False,
                    **{k: v[None] for k, v in prompt.token_type_ids.items()})
            new = gen[0, len(prompt.input_ids):].tolist()
            if tok.eos_token_id not in new or new.index(tok.eos_token_id) == 0:
                continue
            answer_ids = new[:new.index(tok.eos_token_id)]
            answer = tok.decode(answer_ids)
            ex = encode(processor, image, instruction, answer)
            if ex.input_ids[ex.answer_slice].tolist() != answer_ids:
                continue  # the text does not re-tokenise to the same ids: not a fair comparison
            own.append(ex)
            other = next(t for t in ["red", "yes", "7", "no"] if t != answer)
            changed.append(encode(processor, image, instruction, other))
    assert len(own) >= 5, "the tiny base model should end most short answers within 6 tokens"
    assert all(greedy_exact(model, processor, own))
    assert not any(greedy_exact(model, processor, changed))


def test_cli_base_names_a_bad_family_or_size_before_building(capsys):
    from training.world.__main__ import main
    assert main(["--base", "nope:toy"]) == 2
    assert "unknown family 'nope'" in capsys.readouterr().err
    assert main(["--base", "qwen2_5_vl:huge"]) == 2
    assert "unknown model size 'huge'" in capsys.readouterr().err


def test_cached_base_is_rebuilt_when_its_plan_changes(tiny_base, tmp_path, monkeypatch):
    """The cache key covers the pretraining configs: an edited YAML makes the cached base model stale."""
    from training.config import resolve_path
    from training.world import base as B
    plan = B.plan_fingerprint("qwen2_5_vl", "tiny")
    assert json.loads((tiny_base / B.BASE_JSON).read_text())["plan"] == plan
    assert B.is_built(tiny_base, plan)
    edited = tmp_path / "edited.yaml"
    edited.write_text(resolve_path("world-pretrain-tiny").read_text().replace("max_steps: 120", "max_steps: 121"))
    monkeypatch.setattr("training.config.resolve_path", lambda name: edited)
    other = B.plan_fingerprint("qwen2_5_vl", "tiny")
    assert other != plan and not B.is_built(tiny_base, other)
    edited.write_text(resolve_path("world-pretrain-tiny").read_text() + "# a comment changes nothing\n")
    assert B.plan_fingerprint("qwen2_5_vl", "tiny") == plan
    assert B.plan_fingerprint("qwen2_5_vl", "toy") != B.plan_fingerprint("llava_onevision", "toy")


def test_a_base_built_by_two_processes_takes_the_same_steps_as_one(tiny_base, tmp_path, monkeypatch):
    """The toy plan builds with 2 one-thread processes (PRETRAIN_PROCESSES): the global batch is kept, so the
    loss of every step is the one-process build's up to float summation order; the number of processes is
    part of the plan's fingerprint, and a failure names the phase."""
    from training.run import RunError, run_in_processes
    from training.world import base as B
    monkeypatch.setitem(B.PRETRAIN_PROCESSES, "tiny", 2)
    assert B.plan_fingerprint("qwen2_5_vl", "tiny") != json.loads((tiny_base / B.BASE_JSON).read_text())["plan"]
    world = Path(json.loads((tiny_base / B.BASE_JSON).read_text())["world"])
    two = B.pretrain("qwen2_5_vl", "tiny", tmp_path / "two", run_in_processes, world=world, quick_check=False,
                     overrides=["train.max_steps=6", "train.progress=false"])
    one = B.pretrain("qwen2_5_vl", "tiny", tmp_path / "one", lambda cfg, name, processes: run_in_processes(cfg, name),
                     world=world, quick_check=False, overrides=["train.max_steps=6", "train.progress=false"])
    logs = {k: [json.loads(line) for line in (p / "pretrain_log.jsonl").read_text().splitlines()]
            for k, p in (("two", two), ("one", one))}
    steps = {k: [(r["step"], r["tokens"]) for r in v if "loss" in r] for k, v in logs.items()}
    assert steps["two"] == steps["one"] and len(steps["one"]) == 6
    assert [r["loss"] for r in logs["two"] if "loss" in r] == pytest.approx(
        [r["loss"] for r in logs["one"] if "loss" in r], rel=1e-4)
    with pytest.raises(RunError, match="does not split between 2 processes"):
        B.pretrain("qwen2_5_vl", "tiny", tmp_path / "odd", run_in_processes, world=world, quick_check=False,
                   overrides=["train.batch_size=7"])
