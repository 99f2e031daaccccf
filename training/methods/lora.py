"""LoRA through peft: low-rank adapters on the recipe's Linear modules of the LM decoder layers.

Targets are exact module paths from the recipe machinery (`mlp` by default: every LM layer's gate, up and
down projections), so the vision tower's own q_proj / gate_proj are never adapted. The base weights stay
frozen and bitwise unchanged; only lora_A / lora_B train, at `lora.lr` (the paper's 5e-5).

Stages: one adapter for the whole run. Stage 1 creates it over the base; stage k loads stage k-1's adapter
(trainable) over the same base and keeps training it. Every stage folder is a PEFT adapter folder
(adapter_config.json + adapter_model.safetensors + the processor files) whose base_model_name_or_path is
`../stage-00-base`, so each stage loads on its own (training.checkpoints.load merges it into the base for probes).
With `lora.save_merged`, RUN/merged/ also gets each stage merged into a plain checkpoint (a run directory).
"""
from __future__ import annotations

import json
import os
import sys

from torch import nn

from .. import checkpoints
from ..recipes import AppliedRecipe, RecipeError, catalogue, plan
from .base import Method, StageContext, save_model

# Recipe parts LoRA can adapt when they are Linear modules: the projections inside an LM decoder layer
# (fused qkv / gate_up and shared experts included; 3-D expert Parameters are not Linear modules).
ADAPTABLE = ("attn.q", "attn.k", "attn.v", "attn.o", "attn.qkv", "attn.kv", "mlp.gate", "mlp.up", "mlp.down",
             "mlp.gate_up", "shared.gate", "shared.up", "shared.down", "shared.gate_up")


def target_modules(model: nn.Module, recipe: str) -> list[str]:
    """Module paths of the Linear layers `recipe` selects (a selected bias names its layer; biases stay frozen);
    anything else it selects is an error."""
    info = {p.name: p for p in catalogue(model)}
    modules, other = [], []
    for name in plan(model, recipe).trainable:
        p = info[name]
        module = name.rsplit(".", 1)[0]
        if p.part in ADAPTABLE and isinstance(model.get_submodule(module), nn.Linear):
            if module not in modules:
                modules.append(module)
        else:
            other.append(name)
    if other:
        raise RecipeError(f"lora: recipe {recipe!r} selects {other[0]}, which is not a Linear projection of "
                          "an LM decoder layer (PEFT wraps no norm, router or 3-D expert tensor); LoRA pairs with "
                          "per-layer recipes (mlp, mlp_gate_up, sa_proj, sa_qkv, mlp_down and their _lastN/_firstN "
                          "variants, or specs of attn.* / mlp.* parts)")
    return modules


class LoRA(Method):
    name = "lora"
    default_recipe = "mlp"
    variants = ("merged",)
    sharded_ok = False

    def active_variants(self):
        return ("merged",) if self.cfg["lora"]["save_merged"] else ()

    def train_config(self, train_cfg):
        lr = self.cfg["lora"]["lr"]
        return train_cfg if lr is None else dict(train_cfg, lr=lr)

    def check(self, model):
        target_modules(model, self.recipe)

    def load(self, path, opts):
        if not checkpoints.is_adapter(path):
            return checkpoints.load_model(path, opts)
        from peft import PeftModel

        base = checkpoints.load_model(checkpoints.adapter_base(path), opts)
        return PeftModel.from_pretrained(base, str(path), is_trainable=True)

    def select(self, model):
        from peft import LoraConfig, PeftModel, get_peft_model

        if not isinstance(model, PeftModel):  # stage 1: a new adapter (initialised from the stage's seed)
            modules = target_modules(model, self.recipe)
            c = self.cfg["lora"]
            r = c["r"]
            fit = min(min(m.in_features, m.out_features) for m in map(model.get_submodule, modules))
            if r > fit:
                print(f"[lora] r {r} exceeds the smallest adapted dimension {fit}; using r {fit}", file=sys.stderr)
                r = fit
            config = LoraConfig(r=r, lora_alpha=c["alpha"], lora_dropout=c["dropout"], target_modules=modules,
                                bias="none")
            model = get_peft_model(model, config)
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        if not names or not all(".lora_" in n for n in names):
            raise RuntimeError(f"lora: unexpected trainable tensors {[n for n in names if '.lora_' not in n][:3]}")
        total = sum(p.numel() for p in model.parameters())
        return model, AppliedRecipe(recipe=f"lora+{self.recipe}", spec=self.recipe, trainable=names,
                                    trainable_params=sum(p.numel() for p in params), total_params=total,
                                    groups=[{"name": "default", "params": params, "names": names}])

    def finish(self, model, ctx: StageContext, trainable, state):
        with checkpoints.atomic_dir(ctx.path) as tmp:
            # adapter_config.json + adapter_model.safetensors (embeddings are never adapted here)
            model.save_pretrained(str(tmp), save_embedding_layers=False)
            ctx.processor.save_pretrained(tmp)
            cfg_path = tmp / checkpoints.ADAPTER_CONFIG
            meta = json.loads(cfg_path.read_text())
            meta["base_model_name_or_path"] = os.path.relpath(ctx.stage0, ctx.path)
            cfg_path.write_text(json.dumps(meta, indent=2))
        if "merged" in self.active_variants():
            targets = sorted(model.peft_config["default"].target_modules)
            merged = model.merge_and_unload()  # the stage is saved; the next stage reloads it from disk
            save_model(merged, ctx, ctx.variant_path("merged"), [f"{m}.weight" for m in targets])
