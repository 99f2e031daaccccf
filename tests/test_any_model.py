"""Any Hugging Face model: the parts discovery finds and the recipes select, on tiny random models of many
families (training/families/zoo.py), checked against an independent walk of the module tree (by module
class), against forward hooks (nothing selected runs outside the language model), and by one real
optimizer step; a model type no test names works with no new code; training.run on a new VLM and a text LM."""
import copy
import json

import pytest
import torch
from PIL import Image
from torch import nn

from training import recipes
from training.chat import encode
from training.families import discovered_family, family_of_model, zoo
from training.families.discover import DiscoveryError
from training.recipes import RecipeError, apply_recipe, plan

ZOO = [n for n in zoo.TINY if zoo.available(n)]  # every entry on 5.17-5.24
LM_RECIPES = ["sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down"]
# Recipes only some kinds have (each is an error elsewhere: it selects nothing).
EXTRA = {"qwen3_vl_moe": ["experts", "router"], "qwen3_5": ["linear_attn"], "mllama": ["xattn"]}


@pytest.fixture(scope="module")
def zoo_models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo.build(name)
        return cache[name]
    return get


def _decoder_layers(model) -> list[tuple[str, nn.Module]]:
    dec = model.get_decoder()
    (prefix,) = [n for n, m in model.named_modules() if m is dec]
    return [(f"{prefix}.{n}", m) for n, m in dec.named_modules() if type(m).__name__.endswith("DecoderLayer")]


def _owned(module: nn.Module, prefix: str) -> set[str]:
    return {f"{prefix}.{n}" for n, _ in module.named_parameters()}


def reference(model, recipe: str) -> set[str]:
    """What a recipe must train, from module classes alone: softmax attention = a module whose class ends in
    Attention (not cross, not vision) and its Linear children; MLP = modules whose class ends in MLP or
    Experts; routers are not MLP; gate/up/down by the Linear's (or 3-D Parameter's) name."""
    out = set()
    for lname, layer in _decoder_layers(model):
        for mname, m in layer.named_modules():
            cls = type(m).__name__
            path = f"{lname}.{mname}"
            if recipe in ("sa_proj", "sa_qkv") and cls.endswith("Attention") and "Cross" not in cls:
                for c, lin in m.named_children():
                    if isinstance(lin, nn.Linear) and (recipe == "sa_proj" or c not in ("o_proj", "dense")):
                        out |= _owned(lin, f"{path}.{c}")
            if recipe.startswith("mlp") and (cls.endswith("MLP") or cls.endswith("Experts")):
                for n, _ in m.named_parameters():
                    down = "down" in n
                    if recipe == "mlp" or (recipe == "mlp_down") == down:
                        out.add(f"{path}.{n}")
            if recipe == "xattn" and "cross_attn" in mname.split(".")[0]:
                out |= {f"{path}.{n}" for n, _ in m.named_parameters(recurse=False)}
            if recipe == "linear_attn" and "DeltaNet" in cls:
                out |= _owned(m, path)
            if recipe == "experts" and cls.endswith("Experts"):
                out |= _owned(m, path)
            if recipe == "router" and cls.endswith("Router"):
                out |= _owned(m, path)
        if recipe == "xattn":
            out |= {f"{lname}.{n}" for n, _ in layer.named_parameters(recurse=False) if "cross_attn" in n}
    return out


def _batch(name, processor):
    image = Image.new("RGB", (48, 32), (30, 160, 90)) if zoo.TINY[name].placeholder else None
    ex = encode(processor, image, "how many dots?", "there are 3 dots")
    return {"input_ids": ex.input_ids[None], "attention_mask": torch.ones(1, len(ex), dtype=torch.long),
            **ex.image_inputs, **{k: v[None] for k, v in ex.token_type_ids.items()}}


def _outside_lm(model, batch) -> set[str]:
    """Names of the parameters whose module ran while the language model (get_decoder()) was not running."""
    owner = {id(m): n for n, m in model.named_modules()}
    state, ran_outside = {"in_lm": 0}, set()
    dec = model.get_decoder()
    hooks = [dec.register_forward_pre_hook(lambda *a: state.update(in_lm=state["in_lm"] + 1)),
             dec.register_forward_hook(lambda *a: state.update(in_lm=state["in_lm"] - 1))]
    for m in model.modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_hook(
                lambda mod, *a: ran_outside.add(owner[id(mod)]) if not state["in_lm"] else None))
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    return {f"{m}.{n}" if m else n for m in ran_outside for n, _ in model.get_submodule(m).named_parameters(recurse=False)}


@pytest.mark.parametrize("name", ZOO)
def test_recipes_match_module_tree_and_never_run_outside_the_lm(name, zoo_models):
    model, processor = zoo_models(name)
    outside = _outside_lm(model, _batch(name, processor))
    fam = family_of_model(model)
    assert outside, "the hooks saw nothing run outside the language model; the check would be vacuous"
    if fam.vision:  # the vision tower and projector ran, outside the LM
        assert any(n.startswith(fam.vision + ".") for n in outside)
    for recipe in LM_RECIPES + EXTRA.get(name, []):
        if recipe == "sa_qkv" and name == "phi3":
            continue  # fused qkv: checked below
        expected = reference(model, recipe)
        assert expected, (name, recipe)
        got = set(plan(model, recipe).trainable)
        assert got == expected, (name, recipe, sorted(got ^ expected)[:4])
        assert not got & outside, (name, recipe)


@pytest.mark.parametrize("name", ZOO)
def test_one_step_changes_exactly_the_recipe(name, zoo_models):
    base, processor = zoo_models(name)
    batch = _batch(name, processor)
    for recipe in ["sa_proj", "mlp_gate_up"] + EXTRA.get(name, []):
        model = copy.deepcopy(base)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        applied = apply_recipe(model, recipe)
        # weight decay makes every tensor that gets a gradient move, whatever the gradient's size
        opt = torch.optim.AdamW([{"params": g["params"]} for g in applied.groups], lr=1e-2, weight_decay=0.1)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == set(applied.trainable), (name, recipe, sorted(changed ^ set(applied.trainable))[:4])


def test_fused_tensors_are_whole_or_refused(zoo_models):
    phi3, _ = zoo_models("phi3")
    assert all("qkv_proj" in n for n in plan(phi3, "sa_qkv").trainable)
    for spec in ("attn.q", "attn -attn.k", "mlp.gate", "mlp -mlp.up"):
        with pytest.raises(RecipeError, match="fused tensor"):
            plan(phi3, spec)
    glm, _ = zoo_models("glm4v")
    gate_up = set(plan(glm, "mlp_gate_up").trainable)
    assert gate_up and all(n.endswith("mlp.gate_up_proj.weight") for n in gate_up)
    moe, _ = zoo_models("qwen3_vl_moe")
    assert all("experts.gate_up_proj" in n for n in plan(moe, "mlp_gate_up").trainable)
    assert not any(n.endswith("mlp.gate.weight") for n in plan(moe, "mlp").trainable)  # never the router


@pytest.mark.parametrize("name,spec", [("llama", "linear_attn"), ("llama", "xattn"), ("qwen3_vl", "experts"),
                                       ("qwen3_vl", "router")])
def test_a_recipe_that_selects_nothing_is_an_error(name, spec, zoo_models):
    model, _ = zoo_models(name)
    with pytest.raises(RecipeError, match="selects no parameter"):
        plan(model, spec)


def test_attention_free_model_has_no_sa_proj():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, state_size=4, num_hidden_layers=2))
    assert set(plan(model, "linear_attn").trainable) == {n for n, _ in model.named_parameters() if ".mixer." in n}
    with pytest.raises(RecipeError, match="selects no parameter"):
        plan(model, "sa_proj")


def test_a_model_type_no_test_names_works_with_no_new_code():
    """OLMo-2 and Aya Vision: not in the zoo, not overridden; discovery reads them as it reads Llama / LLaVA."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Olmo2Config, Olmo2ForCausalLM

    olmo = Olmo2ForCausalLM(Olmo2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    assert set(plan(olmo, "sa_proj").trainable) == reference(olmo, "sa_proj")
    assert set(plan(olmo, "mlp_gate_up").trainable) == reference(olmo, "mlp_gate_up")
    aya = AyaVisionForConditionalGeneration(AyaVisionConfig(
        text_config=dict(model_type="cohere2", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)))
    fam = family_of_model(aya)
    assert fam.vision == "model.vision_tower" and fam.projector == ("model.multi_modal_projector",)
    assert set(plan(aya, "sa_proj").trainable) == reference(aya, "sa_proj")
    assert not any("vision_tower" in n or "projector" in n for n in plan(aya, "mlp").trainable)


def test_gpt2_fused_conv1d_attention_is_discovered():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2))
    assert set(plan(gpt2, "sa_qkv").trainable) == {f"transformer.h.{i}.attn.c_attn.{w}" for i in range(2)
                                                   for w in ("weight", "bias")}
    assert set(plan(gpt2, "mlp_gate_up").trainable) == {f"transformer.h.{i}.mlp.c_fc.{w}" for i in range(2)
                                                        for w in ("weight", "bias")}
    with pytest.raises(RecipeError, match="fused tensor"):
        plan(gpt2, "attn.v")


def test_an_override_can_reclassify_layer_tensors(zoo_models):
    from training.families import Family
    from training.recipes import catalogue

    class NoRouter(Family):
        def layer_roles(self, layer):
            return {n: "layer.other" if r == "router" else r for n, r in super().layer_roles(layer).items()}

    moe, _ = zoo_models("qwen3_vl_moe")
    fam = discovered_family(moe)
    override = NoRouter(**{k: getattr(fam, k) for k in fam.__dataclass_fields__})
    assert not any(p.part == "router" for p in catalogue(moe, override))


def test_discovery_names_the_model_type_and_what_is_missing(zoo_models):
    model, _ = zoo_models("llama")
    broken = copy.deepcopy(model)
    broken.config.num_hidden_layers = 5
    with pytest.raises(DiscoveryError, match=r"'llama'.*num_hidden_layers=5.*layers\[2\]"):
        discovered_family(broken)


def test_overrides_agree_with_discovery(tiny_models):
    """The three hand-written adapters are only build/processor code now: discovery finds their paths."""
    from training.families import FAMILIES

    for name, fam in FAMILIES.items():
        found = discovered_family(tiny_models(name)[0])
        assert (found.layers, found.embed, found.final_norm, found.lm_head, found.vision) == \
            (fam.layers, fam.embed, fam.final_norm, fam.lm_head, fam.vision)
        assert set(found.projector) == set(fam.projector)


def test_cli_lists_families_and_builds_zoo_models(capsys):
    assert recipes.main(["--list-families"]) == 0
    out = capsys.readouterr().out
    for name in ["qwen2_5_vl", "qwen3_vl", "mllama", "phi3"]:
        assert name in out
    assert recipes.main(["--family", "qwen3_5", "--recipe", "linear_attn", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["family"] == "qwen3_5" and all(".linear_attn." in n for n in got["trainable"])


def test_cli_reads_a_checkpoint_of_a_discovered_family(capsys, tmp_path, zoo_models):
    model, processor = zoo_models("phi3")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert recipes.main(["--model", str(tmp_path), "--recipe", "mlp_gate_up", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["family"] == "phi3" and got["trainable"] == [f"model.layers.{i}.mlp.gate_up_proj.weight" for i in range(2)]
    assert recipes.main(["--model", str(tmp_path), "--recipe", "attn.q"]) == 2
    assert "fused tensor" in capsys.readouterr().err


def _records(root, with_image: bool, n: int = 6) -> list[dict]:
    out = []
    for i in range(n):
        colour, answer = [("red", "two"), ("blue", "three")][i % 2]
        rec = {"id": f"r{i}", "conversations": [{"from": "human", "value": "How many squares are there?"},
                                                {"from": "gpt", "value": answer}]}
        if with_image:
            rel = f"{colour}-{i}.png"
            Image.new("RGB", (32, 32), {"red": (220, 30, 30), "blue": (30, 40, 220)}[colour]).save(root / "images" / rel)
            rec["image"] = rel
            rec["conversations"][0]["value"] = "<image>\n" + rec["conversations"][0]["value"]
        out.append(rec)
    return out


@pytest.mark.parametrize("name,recipe", [("qwen3_vl", "sa_proj"), ("qwen3", "mlp_gate_up"), ("mllama", "xattn"),
                                         ("qwen3_5", "linear_attn"), ("qwen3_vl_moe", "mlp"), ("phi3", "sa_proj"),
                                         ("gemma3", "mlp"), ("internvl", "sa_proj"), ("idefics3", "mlp"),
                                         ("glm4v", "mlp_gate_up")])  # one of each kind (all 15 pass; time)
def test_training_run_trains_exactly_the_recipe(name, recipe, tmp_path):
    from training.checkpoints import load
    from training.config import load_config
    from training.run import run

    base = tmp_path / "base"
    model, processor = zoo.build(name)
    model.save_pretrained(base)
    processor.save_pretrained(base)
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    for task in ("a", "b"):
        (root / "tasks" / task).mkdir(parents=True)
        (root / "tasks" / task / "train.json").write_text(json.dumps(_records(root, zoo.TINY[name].placeholder != "")))
    cfg = load_config("toy-tiny", ["train.progress=false", f"base={base}", f"data.root={root}", "tasks=[a,b]",
                                   "train.max_steps=2", "train.batch_size=2", "train.warmup_ratio=0",
                                   "data.max_examples=4"])
    cfg["recipe"], cfg["out"] = recipe, str(tmp_path / "run")
    out = run(cfg, "toy-tiny")
    man = json.loads((out / "run.json").read_text())
    assert man["family"] == name and [s["name"] for s in man["stages"]] == ["base", "a", "b"]
    first, last = (dict(load(out / s["path"])[0].named_parameters()) for s in man["stages"][::2])
    changed = {k for k in first if not torch.equal(first[k], last[k])}
    assert changed and changed <= set(plan(model, recipe).trainable)  # trained, and nothing else


def test_lora_targets_fused_linears_and_refuses_3d_experts(zoo_models):
    from training.methods.lora import target_modules

    phi3, _ = zoo_models("phi3")
    assert set(target_modules(phi3, "sa_proj")) == {f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                                    for m in ("qkv_proj", "o_proj")}
    moe, _ = zoo_models("qwen3_vl_moe")
    with pytest.raises(RecipeError, match="3-D expert"):
        target_modules(moe, "mlp")


def test_a_delta_of_a_discovered_family_loads_over_its_base(tmp_path, zoo_models):
    from training.checkpoints import family_of, load, save_delta

    base, processor = zoo_models("qwen3_vl_moe")
    base.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    tuned = copy.deepcopy(base)
    names = plan(tuned, "experts").trainable
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n in names:
                p.add_(1.0)
    save_delta(tuned, processor, tmp_path / "delta", tmp_path / "base", names, family_of_model(tuned))
    assert family_of(tmp_path / "delta").layers == "model.language_model.layers"
    loaded = dict(load(tmp_path / "delta")[0].named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in tuned.named_parameters())
