"""Recipes train exactly what they say, on every family, checked against an independent walk of the
module tree (by module class, not by our part paths), and by one real optimizer step."""
import copy
import json

import pytest
import torch
from PIL import Image
from torch import nn

from training import recipes
from training.recipes import RECIPES, RecipeError, apply_recipe, plan

from .conftest import FAMILY_NAMES

# Module classes, per family, that the independent reference looks for.
VISION_TOWERS = {"Qwen2_5_VisionTransformerPretrainedModel", "SiglipVisionModel", "CLIPVisionModel"}
PROJECTORS = {"Qwen2_5_VLPatchMerger", "LlavaOnevisionMultiModalProjector", "LlavaNextMultiModalProjector"}
TEXT_MODELS = {"Qwen2_5_VLTextModel", "Qwen2Model", "MistralModel", "LlamaModel"}


def _params_under(model: nn.Module, prefix: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n == prefix or n.startswith(prefix + ".")}


def _modules(model, class_names):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in class_names]


def _decoder_layers(model):
    """Decoder layers found by class name inside the text model: the only home of attn/MLP recipes."""
    (text_name, text), = _modules(model, TEXT_MODELS)
    return [(f"{text_name}.{n}", m) for n, m in text.named_modules() if type(m).__name__.endswith("DecoderLayer")]


def reference_selection(model: nn.Module, recipe: str) -> set[str]:
    """What a recipe must train, derived from the module tree without the recipe code."""
    everything = {n for n, _ in model.named_parameters()}
    vision = set().union(*(_params_under(model, n) for n, _ in _modules(model, VISION_TOWERS)))
    projector = set().union(*(_params_under(model, n) for n, _ in _modules(model, PROJECTORS)))
    projector |= {n for n in everything if n.endswith("image_newline")}
    (text_name, _), = _modules(model, TEXT_MODELS)
    lm = _params_under(model, text_name) | {n for n, p in model.named_parameters()
                                             if p is model.get_output_embeddings().weight}

    def in_layers(children, layers=None):
        out = set()
        dec = _decoder_layers(model)
        for i, (lname, _) in enumerate(dec):
            if layers is not None and i not in layers:
                continue
            for parent, child in children:
                out |= _params_under(model, f"{lname}.{parent}.{child}")
        return out

    attn = [("self_attn", c) for c in ("q_proj", "k_proj", "v_proj", "o_proj")]
    table = {
        "full": everything,
        "vision": vision - projector,
        "projector": projector,
        "llm": lm,
        "sa_proj": in_layers(attn),
        "sa_qkv": in_layers(attn[:3]),
        "mlp": in_layers([("mlp", c) for c in ("gate_proj", "up_proj", "down_proj")]),
        "mlp_gate_up": in_layers([("mlp", "gate_proj"), ("mlp", "up_proj")]),
        "mlp_down": in_layers([("mlp", "down_proj")]),
    }
    n_layers = len(_decoder_layers(model))
    table["sa_proj_last1"] = in_layers(attn, {n_layers - 1})
    table["mlp_gate_up_first1"] = in_layers([("mlp", "gate_proj"), ("mlp", "up_proj")], {0})
    return table[recipe]


ALL_RECIPES = list(RECIPES) + ["sa_proj_last1", "mlp_gate_up_first1"]


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_trainable_set_matches_module_tree(name, recipe, tiny_models):
    model, _ = tiny_models(name)
    expected = reference_selection(model, recipe)
    assert expected, "the reference selected nothing; the test would be vacuous"
    got = plan(model, recipe)
    assert set(got.trainable) == expected
    assert got.trainable_params == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert got.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("recipe", ["llm", "sa_proj", "sa_qkv", "mlp", "mlp_gate_up", "mlp_down", "llm_last1"])
def test_lm_recipes_never_touch_vision_or_projector(name, recipe, tiny_models):
    model, _ = tiny_models(name)
    names = plan(model, recipe).trainable
    bad = [n for n in names if any(k in n for k in ("visual", "vision_tower", "multi_modal_projector",
                                                     "image_newline"))]
    assert not bad
    if recipe != "llm":
        layer_prefixes = tuple(f"{n}." for n, _ in _decoder_layers(model))
        assert all(n.startswith(layer_prefixes) for n in names)


def test_vision_substring_pitfall_is_avoided(tiny_models):
    """Qwen2.5-VL's vision blocks have mlp.gate_proj; SigLIP/CLIP layers have self_attn.q_proj."""
    qwen, _ = tiny_models("qwen2_5_vl")
    assert any("visual" in n and "gate_proj" in n for n, _ in qwen.named_parameters())
    assert not any("visual" in n for n in plan(qwen, "mlp_gate_up").trainable)
    for fam in ("llava_onevision", "llava_next"):
        model, _ = tiny_models(fam)
        assert any("vision_tower" in n and "q_proj" in n for n, _ in model.named_parameters())
        assert not any("vision_tower" in n for n in plan(model, "sa_proj").trainable)


def test_spec_language_composes(tiny_models):
    model, _ = tiny_models("qwen2_5_vl")
    assert set(plan(model, "mlp -mlp.down").trainable) == set(plan(model, "mlp_gate_up").trainable)
    assert set(plan(model, "attn.q, attn.k + attn.v").trainable) == set(plan(model, "sa_qkv").trainable)
    assert set(plan(model, "layers[-1:].attn").trainable) == set(plan(model, "sa_proj_last1").trainable)
    assert set(plan(model, "layers[1].layer").trainable) == set(plan(model, "llm_last1").trainable)
    assert set(plan(model, "vision projector").trainable) == \
        set(plan(model, "vision").trainable) | set(plan(model, "projector").trainable)


@pytest.mark.parametrize("bad,match", [
    ("bogus", "valid recipes: full, vision, projector, llm, sa_proj"),
    ("mlp -mlp", "selects no parameter"),
    ("vision_last2", "no layer-range variant"),
    ("layers[-1:].vision", "not a per-layer part"),
    ("layers[7].attn", "out of range"),
    ("layers[a:b].attn", "not an integer or a slice"),
    ("layers[5:].attn", "selects no parameter"),
    ("attn.z", "unknown recipe"),
])
def test_bad_recipes_are_clear_errors(bad, match, tiny_models):
    model, _ = tiny_models("qwen2_5_vl")
    with pytest.raises(RecipeError, match=match):
        plan(model, bad)


def test_vision_params_get_their_own_group(tiny_models):
    model, _ = tiny_models("llava_onevision")
    groups = {g["name"]: g for g in plan(model, "full").groups}
    assert set(groups) == {"vision", "default"}
    assert all("vision_tower" in n for n in groups["vision"]["names"])
    assert not any("vision_tower" in n for n in groups["default"]["names"])


def test_tied_embeddings_cannot_be_split(tiny_models):
    model, _ = tiny_models("qwen2_5_vl")
    tied = copy.deepcopy(model)
    tied.lm_head.weight = tied.model.language_model.embed_tokens.weight
    with pytest.raises(RecipeError, match="tied"):
        plan(tied, "lm_head")
    assert plan(tied, "lm_head embed").trainable_params == tied.lm_head.weight.numel()


def _one_step(model, processor, recipe):
    applied = apply_recipe(model, recipe)
    # weight decay makes every tensor that gets a gradient move, whatever the gradient's size.
    opt = torch.optim.AdamW([{"params": g["params"]} for g in applied.groups], lr=1e-2, weight_decay=0.1)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many dots?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "there are 3 dots"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    img = Image.new("RGB", (48, 32), (30, 160, 90))
    enc = processor(text=[text], images=[img], return_tensors="pt")
    model.train()
    out = model(**enc, labels=enc["input_ids"])
    out.loss.backward()
    opt.step()
    return applied


# Parameters the forward pass never uses, so no optimizer step can change them: LLaVA-NeXT reads the
# CLIP features of layer -2, so its last CLIP layer and post-layernorm get no gradient; LLaVA-OneVision reads
# SigLIP's last hidden state, taken before post_layernorm (both as in the real checkpoints).
UNUSED = {"llava_next": ("vision_tower.encoder.layers.2.", "vision_tower.post_layernorm"),
          "llava_onevision": ("vision_tower.post_layernorm",)}


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("recipe", list(RECIPES) + ["sa_proj_last1"])
def test_one_optimizer_step_changes_exactly_the_recipe(name, recipe, tiny_models):
    base, processor = tiny_models(name)
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = _one_step(model, processor, recipe)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    selected = set(applied.trainable)
    unused = {n for n in selected if any(u in n for u in UNUSED.get(name, ()))}
    assert changed == selected - unused
    for n, p in model.named_parameters():  # frozen tensors never even got a gradient
        if n not in selected:
            assert p.grad is None, n


def test_cli_json_and_table(capsys, tiny_checkpoints):
    assert recipes.main(["--family", "qwen2_5_vl", "--recipe", "mlp_gate_up", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"family", "recipe", "trainable", "trainable_params", "total_params"}
    assert out["family"] == "qwen2_5_vl" and all("mlp.gate_proj" in n or "mlp.up_proj" in n for n in out["trainable"])
    # A real checkpoint folder gives the same answer (architecture read on the meta device).
    path = tiny_checkpoints("qwen2_5_vl")
    assert recipes.main(["--model", str(path), "--recipe", "mlp_gate_up", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == out
    assert recipes.main(["--family", "llava_next", "--recipe", "sa_proj"]) == 0
    table = capsys.readouterr().out
    assert "self_attn.q_proj.weight" in table and table.strip().splitlines()[-1].startswith("trainable ")


def test_cli_bad_input_exits_nonzero_with_message(capsys, tmp_path):
    assert recipes.main(["--family", "nope", "--recipe", "full"]) == 2
    assert "valid families" in capsys.readouterr().err
    assert recipes.main(["--model", str(tmp_path), "--recipe", "full"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
