"""The sequential loop: what changes between stages, that it learns, the loss it optimises, resume after a
kill, and that the run directory is what probes and the design contract expect."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import ConcatDataset, Subset
from transformers import AutoModelForImageTextToText, AutoProcessor

from training import run as run_mod
from training.chat import encode
from training.checkpoints import is_delta, load_model
from training.config import load_config
from training.data import ConversationDataset, TaskFiles
from training.families import FAMILIES
from training.loop import EpochShuffle, LengthGroupedShuffle, example_lengths, make_accelerator, train_stage
from training.recipes import RECIPES, plan
from training.records import record_turns

from .llava_fixture import COLOURS, task_records, write_llava_root

REPO = Path(__file__).resolve().parents[1]
VALIDATE = Path("/work/shared/tools/validate_run.py")
# Parameters no forward pass uses, so nothing trains them (see tests/test_recipes.py).
UNUSED = {"llava_next": ("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm"),
          "llava_onevision": ("vision_tower.post_layernorm",)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~20x faster than two when another
    process is busy (threads spin-wait for each other). Subprocesses here get the same count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_llava_root(tmp_path_factory.mktemp("llava"), n=16)


def _run(tmp, base, root, *extra, recipe="full", name="run"):
    overrides = [f"base={base}", f"data.root={root}", "train.progress=false", *extra]
    cfg = load_config("toy-tiny", overrides)
    cfg["recipe"] = recipe
    cfg["out"] = str(tmp / name)
    return run_mod.run(cfg, "toy-tiny")


def _stage_dirs(out: Path) -> list[Path]:
    man = json.loads((out / "run.json").read_text())
    return [out / s["path"] for s in man["stages"]]


def _file_keys(model) -> dict[str, str]:
    """Parameter name -> key in the saved safetensors (transformers may rename on save)."""
    from transformers.core_model_loading import revert_weight_conversion

    names = [n for n, _ in model.named_parameters()]
    tagged = revert_weight_conversion(model, {n: torch.tensor([i]) for i, n in enumerate(names)})
    return {names[int(t[0])]: k for k, t in tagged.items()}


def _changed(a: Path, b: Path) -> set[str]:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert set(ta) == set(tb)
    return {k for k in ta if not torch.equal(ta[k], tb[k])}


# -- exactly the recipe's tensors change --------------------------------------------------------------
CASES = [("qwen2_5_vl", r) for r in RECIPES] + [("llava_onevision", "full"), ("llava_next", "full"),
                                                ("llava_next", "sa_proj")]


@pytest.mark.parametrize("family,recipe", CASES)
def test_between_stages_exactly_the_recipe_changes(family, recipe, tmp_path, data_root, tiny_checkpoints,
                                                   tiny_models):
    base = tiny_checkpoints(family)
    # weight decay moves every tensor that gets a gradient, however small the gradient
    out = _run(tmp_path, base, data_root, "tasks=[cub200,pixmocount]", "train.max_steps=2", "train.batch_size=4",
               "train.weight_decay=0.1", "train.warmup_ratio=0", recipe=recipe)
    model, _ = tiny_models(family)
    keys = _file_keys(model)
    trainable = set(plan(model, recipe).trainable)
    expected = {keys[n] for n in trainable if not any(u in n for u in UNUSED.get(family, ()))}
    assert expected
    stages = _stage_dirs(out)
    assert [s.name for s in stages] == ["stage-00-base", "stage-01-cub200", "stage-02-pixmocount"]
    for a, b in zip(stages, stages[1:]):
        assert _changed(a, b) == expected, (a.name, b.name)
    assert _changed(Path(base), stages[0]) == set()  # stage 0 is the base
    if recipe == "full":  # every family's stage folders are ordinary HF folders
        assert type(AutoModelForImageTextToText.from_pretrained(stages[-1], local_files_only=True)) is type(model)
        AutoProcessor.from_pretrained(stages[-1], local_files_only=True)


# -- the loss it optimises ------------------------------------------------------------------------------
def test_step_matches_a_slow_reference_and_ignores_micro_batching(tmp_path, tiny_models):
    """One AdamW step with a huge eps is lr * grad / eps: compare it with a gradient computed by hand
    (cross-entropy summed over answer + end-of-turn tokens of all examples / their number), for one batch
    of 4 and for 2 micro-batches of 2 whose answers differ in length (a per-micro-batch mean would differ)."""
    import copy

    from training.data import Collator, ConversationDataset

    base, processor = tiny_models("qwen2_5_vl")
    root = write_llava_root(tmp_path, n=4, tasks=["timeclock"], multi_turn_task=None)
    recs = task_records(root, "timeclock", 4)
    recs[0]["conversations"][1]["value"] = "it is a quarter past three in the afternoon, 3:15 exactly"
    ds = ConversationDataset(recs, processor, root / "images")
    assert len({ds[i].answer_len for i in range(4)}) > 2
    lr, eps, vision_lr = 1.0, 1e3, 0.5
    cfg = load_config("toy-tiny", ["train.max_steps=1", "train.warmup_ratio=0", "train.max_grad_norm=null",
                                   f"train.adam_eps={eps}", f"train.lr={lr}", f"train.vision_lr={vision_lr}",
                                   "train.progress=false"])["train"]

    def step(batch_size, ga):
        model = copy.deepcopy(base)
        c = dict(cfg, batch_size=batch_size, grad_accum=ga)
        train_stage(model, ds, Collator(FAMILIES["qwen2_5_vl"], processor.tokenizer.pad_token_id), c,
                    recipe="full", seed=0, stage=1, accelerator=make_accelerator(c, cpu=True))
        return {n: p.detach() - base.get_parameter(n).detach() for n, p in model.named_parameters()}

    # reference: examples one by one, no padding, hand-written loss
    ref = copy.deepcopy(base).train()
    total, n_tok = 0.0, 0
    for i in range(4):
        e = ds[i]
        out = ref(input_ids=e.input_ids[None], attention_mask=torch.ones_like(e.input_ids)[None], **e.image_inputs,
                  **{k: v[None] for k, v in e.token_type_ids.items()})
        pos = torch.arange(e.prompt_len, e.prompt_len + e.answer_len + e.eot_len)
        total = total + torch.nn.functional.cross_entropy(out.logits[0, pos - 1], e.input_ids[pos], reduction="sum")
        n_tok += len(pos)
    (total / n_tok).backward()
    vision = {n for g in plan(base, "full").groups if g["name"] == "vision" for n in g["names"]}
    assert vision
    want = {n: -(vision_lr if n in vision else lr) * p.grad / (p.grad.abs() + eps)
            for n, p in ref.named_parameters()}
    for bs, ga in [(4, 1), (2, 2)]:
        got = step(bs, ga)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=2e-7, rtol=1e-3, msg=f"{n} (batch {bs} x {ga})")


def test_hooks_see_the_stage_and_can_end_it_and_the_schema_fills_the_settings(tmp_path, tiny_models):
    """A partial `train` dict gets the schema's defaults; every hook sees the start, each step but the last
    and the end (whose record goes to the log); a hook's True ends the stage after that step."""
    import copy

    from training.data import Collator, ConversationDataset
    from training.loop import StageHooks

    class Recorder(StageHooks):
        def __init__(self, stop_at=None):
            self.calls, self.stop_at = [], stop_at

        def on_stage_start(self, stage, model):
            self.calls.append(("start", stage, model.training))

        def on_step(self, step, model, optimizer, scheduler):
            self.calls.append(("step", step))
            return step == self.stop_at

        def on_stage_end(self, steps, model):
            self.calls.append(("end", steps))
            return {"event": "recorded", "steps": steps}

    base, processor = tiny_models("qwen2_5_vl")
    root = write_llava_root(tmp_path, n=4, tasks=["cub200"], multi_turn_task=None)
    ds = ConversationDataset(task_records(root, "cub200", 4), processor, root / "images")
    collate = Collator(FAMILIES["qwen2_5_vl"], processor.tokenizer.pad_token_id)
    cfg = {"max_steps": 3, "batch_size": 2, "progress": False}        # everything else: the schema's defaults
    for stop_at, steps in [(None, 3), (1, 1)]:
        hooks, log = [Recorder(stop_at), Recorder()], []
        result = train_stage(copy.deepcopy(base), ds, collate, cfg, recipe="mlp", seed=0, stage=1, hooks=hooks,
                             log=log.append, accelerator=make_accelerator(cfg, cpu=True))
        assert result.steps == steps
        want = [("start", 1, True)] + [("step", s) for s in range(1, min(steps + 1, 3))] + [("end", steps)]
        assert hooks[0].calls == hooks[1].calls == want
        assert [r for r in log if r.get("event") == "recorded"] == [{"event": "recorded", "steps": steps}] * 2
        assert [r["step"] for r in log if "loss" in r] == list(range(1, steps + 1))


def test_loss_falls_within_a_stage(tmp_path, tiny_checkpoints):
    """A planted task (the colour of the image names the answer): the loss must fall well below its start."""
    root = write_llava_root(tmp_path / "d", n=32, tasks=["cub200"], multi_turn_task=None)
    out = _run(tmp_path, tiny_checkpoints("qwen2_5_vl"), root, "tasks=[cub200]", "train.max_steps=20",
               "train.lr=5e-3", "train.batch_size=4", "train.warmup_ratio=0.1")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.4 * start, (start, end)
    end_rec = [r for r in log if r.get("event") == "stage_end"]
    assert end_rec and end_rec[0]["steps"] == 20 and end_rec[0]["examples"] == 80
    # linear warmup over ceil(10% of 20) = 2 steps, then cosine to zero; the vision tower at its own LR
    want = [s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 18)) for s in range(20)]
    assert [r["lr"] for r in log if "loss" in r] == pytest.approx([5e-3 * w for w in want])
    assert [r["vision_lr"] for r in log if "loss" in r] == pytest.approx([5e-4 * w for w in want])


def test_length_grouped_order_is_a_seeded_permutation_of_similar_lengths():
    lengths = [(7 * i) % 23 + 1 for i in range(500)]
    a = LengthGroupedShuffle(lengths, 8, seed=3, stage=1)
    first = list(a)
    assert sorted(first) == list(range(500)) and first == list(LengthGroupedShuffle(lengths, 8, 3, 1))
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(500))
    plain = [first[i:i + 8] for i in range(0, 500, 8)]
    shuffled = list(EpochShuffle(500, 3, 1))
    spread = lambda batches: sum(max(lengths[k] for k in b) - min(lengths[k] for k in b) for b in batches)  # noqa: E731
    assert spread(plain) < 0.2 * spread([shuffled[i:i + 8] for i in range(0, 500, 8)])


def test_group_by_length_trains_on_every_example_and_reads_mixed_data(tmp_path, tiny_checkpoints):
    """A mixed stage (ConcatDataset of the task and a Subset of the pool) grouped by length: every example once
    per epoch, lengths are the text tokens, and the loss falls like an ungrouped stage's."""
    root = write_llava_root(tmp_path / "d", n=32, tasks=["cub200", "pixmocount"], multi_turn_task=None)
    args = ["tasks=[cub200,pixmocount]", "train.epochs=2", "train.lr=5e-3", "train.batch_size=4",
            "train.warmup_ratio=0", "mix.share=0.25", "mix.sources=[previous]", "train.group_by_length=true"]
    out = _run(tmp_path, tiny_checkpoints("qwen2_5_vl"), root, *args)
    ends = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ends = [r for r in ends if r.get("event") == "stage_end"]
    assert [r["examples"] for r in ends] == [64, 2 * (32 + 11)]  # 11 = round(32 * 0.25 / 0.75) drawn
    processor = AutoProcessor.from_pretrained(tiny_checkpoints("qwen2_5_vl"))
    data = ConversationDataset.from_task(TaskFiles("cub200", root / "tasks/cub200/train.json", root / "images"),
                                         processor)
    lens = example_lengths(ConcatDataset([data, Subset(data, [3, 1])]))
    instruction, answer = record_turns(data.records[3])[0]
    assert lens[-2] == len(processor.tokenizer(f"{instruction} {answer}", add_special_tokens=False)["input_ids"])
    assert len(lens) == len(data) + 2 and lens[-1] == lens[1]
    with pytest.raises(ValueError, match="group_by_length: list has no lengths"):
        example_lengths([1, 2])


# -- resume after a kill, loading, deltas, the contract ------------------------------------------------
RESUME_ARGS = ["tasks=[cub200,pixmocount]", "train.max_steps=30", "train.batch_size=2", "train.grad_accum=2",
               "train.warmup_ratio=0.2"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_root, tiny_checkpoints):
    """The uninterrupted reference run (full saves), in this process."""
    return _run(tmp_path_factory.mktemp("full"), tiny_checkpoints("qwen2_5_vl"), data_root, *RESUME_ARGS)


def _cli(out, base, root):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "training.run", "--config", "toy-tiny", "--out", str(out), f"base={base}",
           f"data.root={root}", "train.progress=false", *RESUME_ARGS]
    return cmd, env


def test_killed_run_resumes_to_identical_weights(tmp_path, full_run, data_root, tiny_checkpoints):
    out = tmp_path / "killed"
    cmd, env = _cli(out, tiny_checkpoints("qwen2_5_vl"), data_root)
    def stages_done():
        try:
            return len(json.loads((out / "run.json").read_text())["stages"])
        except (OSError, ValueError):
            return 0

    err = tmp_path / "stderr.txt"
    with err.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.time() + 120
    while stages_done() < 2:  # stage 1 complete: the kill lands in stage 2
        assert proc.poll() is None, err.read_text()[-2000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s["path"] for s in json.loads((out / "run.json").read_text())["stages"]]
    assert done == ["stage-00-base", "stage-01-cub200"], "the kill did not land in stage 2"
    assert not (out / "stage-02-pixmocount").exists()
    # what a kill during a save leaves: a temporary folder; and a stage folder that run.json does not list
    (out / ".stage-02-pixmocount.tmp-x").mkdir()
    (out / ".stage-02-pixmocount.tmp-x" / "model.safetensors").write_bytes(b"half")
    (out / "stage-02-pixmocount").mkdir()
    (out / "stage-02-pixmocount" / "config.json").write_text("{}")
    (out / "stage-02-pixmocount" / "model.safetensors").write_bytes(b"half")

    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming after stage 1" in res.stderr
    assert not list(out.glob(".stage-*"))
    a, b = _stage_dirs(full_run), _stage_dirs(out)
    assert [p.name for p in a] == [p.name for p in b] == ["stage-00-base", "stage-01-cub200", "stage-02-pixmocount"]
    for x, y in zip(a, b):
        tx, ty = load_file(str(x / "model.safetensors")), load_file(str(y / "model.safetensors"))
        assert all(torch.equal(tx[k], ty[k]) for k in tx), x.name
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log if r.get("event") == "stage_end"] == [1, 2]
    assert sum(1 for r in log if r.get("stage") == 2 and "loss" in r) == 30  # the killed attempt's lines are gone
    # a rerun of a finished run trains nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert run_mod.main(cmd[3:]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_every_stage_loads_with_auto_classes(full_run, data_root):
    proc = None
    for d in _stage_dirs(full_run):
        model = AutoModelForImageTextToText.from_pretrained(d, local_files_only=True)
        proc = AutoProcessor.from_pretrained(d, local_files_only=True)
        assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    from PIL import Image
    ex = encode(proc, Image.new("RGB", (32, 32), COLOURS["red"]), "Which letter names the bird? A, B, C or D.")
    with torch.no_grad():
        assert model.generate(input_ids=ex.input_ids[None], **ex.image_inputs, max_new_tokens=2).shape[1] > 0
    man = json.loads((full_run / "run.json").read_text())
    assert man["captions"] is None and man["benchmarks"] == [] and man["family"] == "qwen2_5_vl"
    assert man["tasks"] == ["cub200", "pixmocount"] and man["config"]["train"]["max_steps"] == 30
    import transformers
    libs = man["libraries"]  # the installed distributions' versions (torch's module version may add "+cu130")
    assert libs["torch"] == torch.__version__.split("+")[0] and libs["transformers"] == transformers.__version__
    assert subprocess.run([sys.executable, str(VALIDATE), str(full_run)], capture_output=True).returncode == 0


def test_delta_run_equals_the_full_run(tmp_path, full_run, data_root, tiny_checkpoints):
    out = _run(tmp_path, tiny_checkpoints("qwen2_5_vl"), data_root, *RESUME_ARGS, "save=delta")
    stages = _stage_dirs(out)
    assert all(is_delta(d) for d in stages)
    assert load_file(str(stages[0] / "delta.safetensors")) == {}
    n_trainable = len(plan(FAMILIES["qwen2_5_vl"].build_tiny()[0], "full").trainable)
    assert len(load_file(str(stages[1] / "delta.safetensors"))) == n_trainable
    for d, f in zip(stages, _stage_dirs(full_run)):
        got, want = load_model(d).state_dict(), load_model(f).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), d.name
    assert subprocess.run([sys.executable, str(VALIDATE), str(out)], capture_output=True).returncode == 0


def test_world_layout_run_names_captions_and_benchmarks(tmp_path, tiny_checkpoints):
    root = write_llava_root(tmp_path / "w", n=4, world=True)
    out = _run(tmp_path, tiny_checkpoints("llava_onevision"), root, "tasks=[pretrain]", "train.max_steps=1",
               "save=delta", recipe="sa_proj")
    man = json.loads((out / "run.json").read_text())
    assert man["captions"] == {"path": str(root / "captions/lcs558k.json"), "images": str(root / "images")}
    assert man["benchmarks"][:5] == ["cub200", "pixmocount", "pathvqa", "textvqa", "timeclock"]
    assert man["benchmarks"][5:] == ["colour"] and man["recipe"] == "sa_proj"
    assert [s["name"] for s in man["stages"]] == ["base", "pretrain"]


# -- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,match", [
    (["train.lrr=1"], "unknown config key 'train.lrr'"),
    (["tasks=[cub200,nosuch]"], "unknown task 'nosuch'"),
    (["data.tasks.cub200.train=/no/such/file.json"], "task 'cub200': training data file /no/such/file.json does not exist"),
    (["base=/no/such/model"], "base '/no/such/model' is not a checkpoint folder"),
    (["family=llava_next"], "config family 'llava_next' but base"),
    (["--recipe", "bogus"], "unknown recipe 'bogus'"),
    (["tasks=[]"], "no tasks"),
])
def test_bad_input_is_a_clear_error(args, match, tmp_path, data_root, tiny_checkpoints, capsys):
    argv = ["--config", "toy-tiny", "--out", str(tmp_path / "r"), f"base={tiny_checkpoints('qwen2_5_vl')}",
            f"data.root={data_root}", *args]
    assert run_mod.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written before the input is known good


def test_a_different_config_is_refused_in_an_existing_run(tmp_path, full_run, data_root, tiny_checkpoints, capsys):
    argv = ["--config", "toy-tiny", "--out", str(full_run), f"base={tiny_checkpoints('qwen2_5_vl')}",
            f"data.root={data_root}", *RESUME_ARGS, "train.lr=0.5"]
    assert run_mod.main(argv) == 2
    assert "config train.lr: 0.001 -> 0.5" in capsys.readouterr().err


def test_two_processes_equal_one_with_the_whole_batch(tmp_path, data_root, tiny_checkpoints):
    """DDP over 2 CPU processes (torchrun; accelerate launch needs MPI for CPU), each with micro-batches of 1
    accumulated twice, takes the same steps as one process with batches of 4: the loss of a step is a mean
    over all its answer tokens, whatever the split (answers here differ in length); only rank 0 writes.
    A huge Adam eps makes each update proportional to the gradient, so a wrong scale would show."""
    base = tiny_checkpoints("qwen2_5_vl")
    args = ["--config", "toy-tiny", f"base={base}", f"data.root={data_root}", "train.progress=false",
            "tasks=[timeclock,pathvqa]", "train.max_steps=3", "train.warmup_ratio=0", "train.adam_eps=1000",
            "train.lr=1000", "train.vision_lr=500", "train.max_grad_norm=null"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "training.run", *args, "--out", str(tmp_path / "ddp"), "train.batch_size=1",
                          "train.grad_accum=2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert run_mod.main([*args, "--out", str(tmp_path / "one"), "train.batch_size=4"]) == 0
    logs = {k: [json.loads(line) for line in (tmp_path / k / "train_log.jsonl").read_text().splitlines()]
            for k in ("ddp", "one")}
    steps = {k: [(r["stage"], r["step"], r["tokens"]) for r in v if "loss" in r] for k, v in logs.items()}
    assert steps["ddp"] == steps["one"] and len(steps["one"]) == 6
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in logs.items()}
    assert losses["ddp"] == pytest.approx(losses["one"], abs=1e-4)
    # compare the difference with the size of the update (float noise is relative to it)
    t0 = load_file(str(Path(base) / "model.safetensors"))
    for a, b in zip(_stage_dirs(tmp_path / "ddp")[1:], _stage_dirs(tmp_path / "one")[1:]):
        ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        for k in ta:
            diff, update = (ta[k] - tb[k]).norm(), (tb[k] - t0[k]).norm()
            assert diff <= 1e-3 * update + 1e-7, (a.name, k, float(diff), float(update))


def test_a_run_of_an_earlier_version_resumes_when_new_keys_keep_their_defaults(tmp_path, full_run, data_root,
                                                                               tiny_checkpoints):
    """A run written before a config key existed resumes (nothing retrains) while the key is at its default;
    a changed setting is still refused."""
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    man = json.loads((out / "run.json").read_text())
    del man["config"]["eval"]["profile"]       # as written before eval.profile existed
    (out / "run.json").write_text(json.dumps(man))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "run.json"}
    _run(tmp_path, tiny_checkpoints("qwen2_5_vl"), data_root, *RESUME_ARGS)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "run.json"} == before
    with pytest.raises(run_mod.RunError, match="eval.profile"):
        _run(tmp_path, tiny_checkpoints("qwen2_5_vl"), data_root, *RESUME_ARGS, "eval.profile=study")
