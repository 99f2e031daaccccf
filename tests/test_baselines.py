"""The baselines (training/methods, training/mixing): each method's defining property, checked on exact tensors,
and each method end to end through training.run, probed and validated like any run."""
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from analysis import forgetting_by_cell, load_run
from probes.evaluate import main as evaluate_main
from probes.run import main as probes_main
from training import moe_layer as moe_mod
from training import run as run_mod
from training.checkpoints import load, load_model
from training.config import ConfigError, load_config
from training.data import Collator, ConversationDataset
from training.families import FAMILIES
from training.loop import make_accelerator, train_stage
from training.methods import LoRA, LwF, MoE, build, label, resolve
from training.methods import lwf as lwf_mod
from training.methods.lora import target_modules
from training.mixing import draw, pool_names
from training.recipes import RecipeError

from .llava_fixture import task_records, write_llava_root

VALIDATE = Path("/work/shared/tools/validate_run.py")
QWEN = "qwen2_5_vl"



@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_llava_root(tmp_path_factory.mktemp("llava"), n=8, world=True)


@pytest.fixture(scope="module")
def batch(tiny_models, data_root):
    """One training batch of the tiny qwen model: 4 examples with images and answer labels."""
    _, processor = tiny_models(QWEN)
    ds = ConversationDataset(task_records(data_root, "timeclock", 4), processor, data_root / "images")
    return Collator(FAMILIES[QWEN], processor.tokenizer.pad_token_id)([ds[i] for i in range(4)])


def cfg_for(*overrides, recipe=None):
    cfg = load_config("toy-tiny", ["train.progress=false", *overrides])
    if recipe is not None:
        cfg["recipe"] = recipe
    return cfg


def _run(tmp, base, root, recipe, *extra, name=None):
    cfg = cfg_for(f"base={base}", f"data.root={root}", "tasks=[cub200,pixmocount]", "train.max_steps=3",
                  "train.batch_size=4", "train.warmup_ratio=0", "train.lr=0.01", *extra, recipe=recipe)
    cfg["out"] = str(tmp / (name or recipe.replace("+", "_")))
    return run_mod.run(cfg, "toy-tiny")


def _stages(out: Path) -> list[Path]:
    return [out / s["path"] for s in json.loads((out / "run.json").read_text())["stages"]]


# -- naming: what run.json's recipe records ------------------------------------------------------------
@pytest.mark.parametrize("overrides,recipe,want", [
    ([], "lora", (("lora", "mlp"), "lora")),
    ([], "lwf+sa_proj", (("lwf", "sa_proj"), "lwf+sa_proj")),
    (["method=lwf"], "sa_proj", (("lwf", "sa_proj"), "lwf+sa_proj")),
    (["method=wise_ft"], "mlp", (("wise_ft", "mlp"), "wise_ft")),
    (["mix.share=0.25", "tag=lowlr"], "sa_proj", ((None, "sa_proj"), "sa_proj+hybrid+lowlr")),
    ([], "moe+mlp_gate_up", (("moe", "mlp_gate_up"), "moe+mlp_gate_up")),
    ([], "mlp_gate_up", ((None, "mlp_gate_up"), "mlp_gate_up")),
])
def test_recipe_names_what_ran(overrides, recipe, want):
    cfg = cfg_for(*overrides, recipe=recipe)
    assert (resolve(cfg), label(cfg)) == want


@pytest.mark.parametrize("overrides,recipe,match", [
    (["method=lwf"], "lora", "names method 'lora' but the config's method is 'lwf'"),
    ([], "lwf+", r"nothing after '\+'"),
    (["mix.share=1"], "sa_proj", "mix.share must be below 1"),
    (["method=bogus"], "sa_proj", "method must be one of"),
    (["eval.domains={a: {image: x}}"], "sa_proj", "eval.domains.a must be"),
])
def test_bad_method_settings_are_clear_errors(overrides, recipe, match):
    with pytest.raises(ConfigError, match=match):
        cfg = cfg_for(*overrides, recipe=recipe)
        build(cfg)


@pytest.mark.parametrize("recipe,match", [
    ("lora+full", "lora: recipe 'full' selects .* not a Linear projection of an LM decoder layer"),
    ("moe+sa_proj", "moe: recipe 'sa_proj' selects .*MLP parts only"),
    ("lwf+layers[7].mlp", "layer 7 out of range"),
])
def test_a_recipe_the_method_cannot_take_fails_before_anything_is_written(recipe, match, tmp_path, data_root,
                                                                         tiny_checkpoints, capsys):
    argv = ["--config", "toy-tiny", "--recipe", recipe, "--out", str(tmp_path / "r"),
            f"base={tiny_checkpoints(QWEN)}", f"data.root={data_root}"]
    assert run_mod.main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# -- LoRA -----------------------------------------------------------------------------------------------
def test_lora_targets_only_lm_decoder_linears(tiny_models):
    for fam in ("llava_onevision", QWEN):
        model, _ = tiny_models(fam)
        layers = FAMILIES[fam].layers
        for recipe, kinds in [("mlp", {"gate_proj", "up_proj", "down_proj"}),
                              ("sa_proj", {"q_proj", "k_proj", "v_proj", "o_proj"})]:
            mods = target_modules(model, recipe)
            n = FAMILIES[fam].num_layers(model)
            assert sorted(mods) == sorted(f"{layers}.{i}.{'mlp' if 'gate_proj' in kinds else 'self_attn'}.{k}"
                                          for i in range(n) for k in kinds)
        with pytest.raises(RecipeError, match="not a Linear projection of an LM decoder layer"):
            target_modules(model, "full")


def test_lora_leaves_every_base_tensor_bitwise_unchanged(tiny_models, data_root):
    base, processor = tiny_models(QWEN)
    model = copy.deepcopy(base)
    cfg = cfg_for("lora.r=4", "lora.lr=0.05", "train.max_steps=3", "train.batch_size=4", "train.warmup_ratio=0",
                  "train.weight_decay=0.1", recipe="lora")
    method = build(cfg)
    assert isinstance(method, LoRA)
    ds = ConversationDataset(task_records(data_root, "cub200", 8), processor, data_root / "images")
    result = train_stage(model, ds, Collator(FAMILIES[QWEN], processor.tokenizer.pad_token_id),
                         method.train_config(cfg["train"]), recipe=method.recipe, seed=0, stage=1,
                         accelerator=make_accelerator(cfg["train"], cpu=True), method=method)
    peft_model = result.model
    assert result.trainable and all(".lora_" in n for n in result.trainable)
    originals = base.state_dict()
    inner = peft_model.base_model.model
    for name, p in inner.named_parameters():
        if ".lora_" in name:
            continue
        key = name.replace(".base_layer", "")
        assert torch.equal(p, originals[key]), name
    lora_b = [p for n, p in inner.named_parameters() if ".lora_B." in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters did train


# -- LwF --------------------------------------------------------------------------------------------------
def _student_out(model, batch):
    return model(**batch, num_items_in_batch=int((batch["labels"][:, 1:] != -100).sum()))


def test_lwf_term_is_zero_for_the_same_model_and_grows_with_divergence(tiny_models, batch):
    base, _ = tiny_models(QWEN)
    cfg = cfg_for(recipe="lwf")
    method = build(cfg)
    assert isinstance(method, LwF) and (method.lam, method.temperature) == (1.0, 2.0)
    n_tok = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        out = _student_out(base, batch)
        method.set_teacher(copy.deepcopy(base))
        same = method.extra_loss(batch, out, n_tok)
        assert abs(float(same)) < 1e-6  # CE + 0: the loss is the cross-entropy
        terms = []
        for scale in (0.01, 0.03, 0.1, 0.3):
            teacher = copy.deepcopy(base)
            g = torch.Generator().manual_seed(1)
            for p in teacher.model.language_model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            method.set_teacher(teacher)
            terms.append(float(method.extra_loss(batch, out, n_tok)))
    assert all(a < b for a, b in zip(terms, terms[1:])), terms
    assert terms[0] > 0


def test_lwf_term_matches_a_slow_reference(tiny_models, batch):
    """lambda * T^2 * sum over answer positions of KL(teacher_T || student_T) / n, against the teacher's full
    forward logits and a hand-written KL in float64."""
    base, _ = tiny_models(QWEN)
    teacher = copy.deepcopy(base)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # far enough apart that float32 resolves the KL to ~1e-5 relative
        for p in teacher.model.language_model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    lam, T = 0.7, 3.0
    method = build(cfg_for(f"lwf.lambda={lam}", f"lwf.temperature={T}", recipe="lwf"))
    method.set_teacher(teacher)
    labels = batch["labels"]
    n_tok = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        out = _student_out(base, batch)
        got = float(method.extra_loss(batch, out, n_tok))
        t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
        s_logits = out.logits.double()
    total = 0.0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] == -100:
                continue
            p = torch.softmax(t_logits[b, i] / T, -1)
            q = torch.softmax(s_logits[b, i] / T, -1)
            total += float((p * (p.log() - q.log())).sum())
    assert got == pytest.approx(lam * T * T * total / n_tok, rel=2e-5)
    assert got > 1e-2


def test_lwf_out_of_memory_raises_instead_of_dropping_the_term(tiny_models, batch, monkeypatch):
    base, _ = tiny_models(QWEN)
    method = build(cfg_for(recipe="lwf"))
    method.set_teacher(copy.deepcopy(base))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(lwf_mod, "teacher_logits", oom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="lwf: out of memory .* never dropped"):
        method.extra_loss(batch, _student_out(base, batch), 10)


# -- MoE --------------------------------------------------------------------------------------------------
def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _perturb_copies(model, scale=0.5):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".mlp.experts.1." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))


def _force_router(model, expert: int):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moe_mod.TwoExpertMLP):
                m.router.weight.zero_()
                m.router.bias.copy_(torch.tensor([200.0, -200.0] if expert == 0 else [-200.0, 200.0]))


def test_moe_forced_to_the_original_expert_reproduces_the_base_exactly(tiny_models, batch):
    base, _ = tiny_models(QWEN)
    want = _logits(base, batch)
    model = copy.deepcopy(base)
    moe_mod.convert(model)
    model.train()
    assert torch.equal(_logits(model, batch), want)  # zero router, identical copy: 0.5 a + 0.5 a = a
    _perturb_copies(model)
    assert not torch.equal(_logits(model, batch), want)  # the copy now matters in the soft mix
    _force_router(model, 0)
    for mode in (model.eval, model.train):  # top-1 and (saturated) top-2 mixing
        mode()
        assert torch.equal(_logits(model, batch), want)
    # forced to the copy: the base with the copy's MLP weights
    _force_router(model, 1)
    model.eval()
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for layer, moe in zip(dense.model.language_model.layers, model.model.language_model.layers):
            layer.mlp.load_state_dict(moe.mlp.experts[1].state_dict())
    assert torch.equal(_logits(model, batch), _logits(dense, batch))


def test_moe_top1_routes_each_token_to_one_expert(tiny_models, batch):
    """A router that sends tokens both ways: each position's hidden output is its chosen expert's output."""
    base, _ = tiny_models(QWEN)
    model = copy.deepcopy(base)
    moe_mod.convert(model)
    _perturb_copies(model)
    layer = model.model.language_model.layers[0].mlp
    with torch.no_grad():
        layer.router.weight.normal_(generator=torch.Generator().manual_seed(0))
        x = torch.randn(2, 7, layer.router.in_features, generator=torch.Generator().manual_seed(1))
        choice = layer.router(x).argmax(-1)
        assert 0 < int(choice.sum()) < choice.numel()
        model.eval()
        ref = torch.where((choice == 0)[..., None], layer.experts[0](x), layer.experts[1](x))
        torch.testing.assert_close(layer(x), ref, atol=1e-6, rtol=1e-5)
        layer.train()
        p = layer.router(x).softmax(-1)
        torch.testing.assert_close(layer(x), p[..., :1] * layer.experts[0](x) + p[..., 1:] * layer.experts[1](x))


def test_moe_select_trains_the_copy_and_router_only(tiny_models):
    base, _ = tiny_models(QWEN)
    model = copy.deepcopy(base)
    moe_mod.convert(model)
    method = build(cfg_for(recipe="moe+mlp_gate_up"))
    assert isinstance(method, MoE)
    _, applied = method.select(model)
    n = FAMILIES[QWEN].num_layers(base)
    want = {f"model.language_model.layers.{i}.mlp.{x}" for i in range(n)
            for x in ("experts.1.gate_proj.weight", "experts.1.up_proj.weight", "router.weight", "router.bias")}
    assert set(applied.trainable) == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == want
    with pytest.raises(RecipeError, match="MLP parts only"):
        build(cfg_for(recipe="moe+sa_proj")).select(model)


# -- data-hybrid ----------------------------------------------------------------------------------------
def test_mixing_draws_a_share_deterministically():
    a = draw(12, 10, 0.25, seed=0, stage=2)
    assert len(a) == 4 and len(set(a)) == 4 and a == draw(12, 10, 0.25, seed=0, stage=2)
    assert a != draw(12, 10, 0.25, seed=0, stage=3) and a != draw(12, 10, 0.25, seed=1, stage=2)
    b = draw(30, 7, 0.5, seed=0, stage=1)  # more than the pool: every pool example once before any repeat
    assert len(b) == 30 and sorted(b[:7]) == list(range(7)) and sorted(b[7:14]) == list(range(7))
    assert draw(12, 0, 0.5, 0, 1) == [] and draw(12, 5, 0.0, 0, 1) == []
    tasks = ["a", "b", "c"]
    assert pool_names(["previous"], tasks, 1) == [] and pool_names(["previous"], tasks, 3) == ["a", "b"]
    assert pool_names(["previous", "pretrain", "b"], tasks, 3) == ["a", "b", "pretrain"]


# -- end to end through training.run ----------------------------------------------------------------------
METHOD_RUNS = {  # recipe -> overrides; each runs 2 stages of 3 steps on the tiny qwen model
    "lora": ["lora.r=4", "lora.lr=0.01", "lora.save_merged=true"],
    "lwf+sa_proj": [],
    "wise_ft": ["wise_ft.alpha=0.3", "wise_ft.keep_finetuned=true"],
    "moe": [],
    "sa_proj": ["mix.share=0.5", "mix.sources=[previous,pretrain]", "tag=lowlr", "train.lr=0.001"],
}


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory, tiny_checkpoints, data_root):
    tmp = tmp_path_factory.mktemp("methods")
    return {r: _run(tmp, tiny_checkpoints(QWEN), data_root, r, *o) for r, o in METHOD_RUNS.items()}


@pytest.mark.parametrize("recipe,label_", [("lora", "lora"), ("lwf+sa_proj", "lwf+sa_proj"), ("wise_ft", "wise_ft"),
                                          ("moe", "moe"), ("sa_proj", "sa_proj+hybrid+lowlr")])
def test_each_method_runs_validates_and_probes(recipe, label_, method_runs):
    out = method_runs[recipe]
    man = json.loads((out / "run.json").read_text())
    assert man["recipe"] == label_
    assert [s["path"] for s in man["stages"]] == ["stage-00-base", "stage-01-cub200", "stage-02-pixmocount"]
    assert man["domains"]["cub200"] == {"image": "birds", "text": "species"}
    dirs = [out] + [out / v for v in ("merged", "finetuned") if (out / v).is_dir()]
    for d in dirs:
        res = subprocess.run([sys.executable, str(VALIDATE), str(d)], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
        assert probes_main(["--ckpt-dir", str(d), "--num-samples", "4", "--batch-size", "4", "--device", "cpu"]) == 0
        table = pd.read_parquet(d / "probes.parquet")
        assert sorted(table["stage"].unique()) == [0, 1, 2]
        assert set(table["recipe"]) == {json.loads((d / "run.json").read_text())["recipe"]}
    # evaluation scores every stage like any run's; analysis reads it, 2x2 cells included
    assert evaluate_main(["--ckpt-dir", str(out), "--limit", "4", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    evals = pd.read_parquet(out / "evals.parquet")
    assert sorted(evals["stage"].unique()) == [0, 1, 2] and set(evals["recipe"]) == {label_}
    cells = forgetting_by_cell(load_run(out))
    assert set(cells["stage"]) == {1, 2} and (cells.query("stage == 1")["cell"] == "image-ID/text-ID").any()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in log) == 6
    if recipe.startswith("lwf"):
        distill = [r["distill"] for r in log if "loss" in r]
        assert distill[0] == 0 and distill[-1] > 0  # the student drifts from its teacher within a stage


def test_lora_run_saves_adapters_over_the_untouched_base(method_runs, tiny_checkpoints):
    out = method_runs["lora"]
    base = load_file(str(Path(tiny_checkpoints(QWEN)) / "model.safetensors"))
    stage0 = load_file(str(out / "stage-00-base" / "model.safetensors"))
    assert all(torch.equal(base[k], stage0[k]) for k in base)
    adapters = [load_file(str(d / "adapter_model.safetensors")) for d in _stages(out)[1:]]
    assert all(all(".lora_" in k for k in a) for a in adapters)
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # stage 2 trained it further
    for d in _stages(out)[1:]:
        meta = json.loads((d / "adapter_config.json").read_text())
        assert meta["base_model_name_or_path"] == "../stage-00-base" and meta["r"] == 4
        adapted, _ = load(d)
        merged, _ = load(out / "merged" / d.name)
        a, m = adapted.state_dict(), merged.state_dict()
        assert all(torch.equal(a[k], m[k]) for k in a)  # the merged sibling is the adapter merged into the base


def test_wise_ft_checkpoint_is_the_alpha_interpolation_exactly(method_runs):
    out, alpha = method_runs["wise_ft"], 0.3
    stages = _stages(out)
    changed = 0
    for prev, cur in zip(stages, stages[1:]):
        tp, tm = load_file(str(prev / "model.safetensors")), load_file(str(cur / "model.safetensors"))
        tf = load_file(str(out / "finetuned" / cur.name / "model.safetensors"))
        for k in tm:
            if torch.equal(tf[k], tp[k]):  # not trained: untouched
                assert torch.equal(tm[k], tp[k]), k
                continue
            changed += 1
            assert ".mlp." in k and "visual" not in k, k  # WiSE-FT tunes the LM's MLP by default
            assert torch.equal(tm[k], alpha * tp[k] + (1 - alpha) * tf[k]), k
    assert changed == 2 * 3 * 2  # 2 stages x (gate, up, down) x 2 layers


def test_moe_run_loads_as_moe_for_probes_and_as_the_base_for_auto_classes(method_runs, tiny_checkpoints, batch):
    out = method_runs["moe"]
    last = _stages(out)[-1]
    meta = json.loads((last / "moe.json").read_text())
    assert meta["experts"] == 2 and meta["layers"] == 2
    model = load_model(last)
    assert moe_mod.is_moe(model) and not model.training
    probe_model, _ = load(last)
    assert moe_mod.is_moe(probe_model)
    copies = load_file(str(last / moe_mod.MOE_WEIGHTS))
    params = dict(model.named_parameters())
    assert set(copies) == set(moe_mod.moe_tensors_names(model))
    assert all(torch.equal(params[k], v) for k, v in copies.items())
    assert any(not torch.equal(params[k], params[k.replace("experts.1", "experts.0")])
               for k in copies if "experts.1" in k)  # the copy trained
    dense = AutoModelForImageTextToText.from_pretrained(last, local_files_only=True)
    base = load_model(tiny_checkpoints(QWEN))
    db, dd = base.state_dict(), dense.state_dict()
    assert all(torch.equal(db[k], dd[k]) for k in db)  # the originals never train
    _force_router(model, 0)
    assert torch.equal(_logits(model, batch), _logits(base, batch))


def test_a_resumed_lora_hybrid_run_gives_bitwise_the_same_weights(tmp_path, tiny_checkpoints, data_root):
    """Stage 2 depends only on stage 1's folder and (seed, stage): rerun it from there and compare."""
    args = ["lora.r=4", "lora.lr=0.01", "mix.share=0.5", "mix.sources=[previous,pretrain]"]
    out = _run(tmp_path, tiny_checkpoints(QWEN), data_root, "lora", *args, name="full")
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    man = json.loads((resumed / "run.json").read_text())
    man["stages"] = man["stages"][:2]
    (resumed / "run.json").write_text(json.dumps(man))
    shutil.rmtree(resumed / "stage-02-pixmocount")
    _run(tmp_path, tiny_checkpoints(QWEN), data_root, "lora", *args, name="resumed")
    a = load_file(str(out / "stage-02-pixmocount" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "stage-02-pixmocount" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ends = [r for r in log if r.get("event") == "stage_end"]
    assert "mixed" in ends[0] and set(ends[1]["mixed"]) == {"cub200", "pretrain"}
