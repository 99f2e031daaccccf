"""The MoE baseline as a training method: every LM decoder layer's MLP becomes two experts, the original
(frozen) and a trainable copy, mixed by a zero-initialised router (the layer: training/moe_layer.py).

With the zero-initialised router and E1 a copy of E0, the converted model computes exactly the original
function (0.5 a + 0.5 a = a in floating point). A run converts the base once (stage 1) and keeps training
the same copy and routers at every later stage; the recipe (default `mlp`) says which of the copy's
projections train (any subset of mlp.gate / mlp.up / mlp.down); the routers always train.

A stage folder is an ordinary checkpoint of the model with its original MLPs plus moe.json and
moe.safetensors (training/moe_layer.py); `training.checkpoints.load` (hence probes and evaluation)
rebuilds the MoE from them.
"""
from __future__ import annotations

from ..moe_layer import convert, decoder_layers, dense_view, is_moe, moe_tensors, write_moe
from ..recipes import AppliedRecipe, RecipeError, catalogue, plan
from .base import Method, StageContext, save_model

TRAINABLE_PARTS = ("mlp.gate", "mlp.up", "mlp.down")


class MoE(Method):
    name = "moe"
    default_recipe = "mlp"
    sharded_ok = False

    def load(self, path, opts):
        model = super().load(path, opts)
        if not is_moe(model):
            convert(model)
        return model

    def dense_names(self, model) -> list[str]:
        """The recipe's tensors in the un-converted model; only MLP projections are allowed."""
        with dense_view(model):
            parts = {p.name: p.part for p in catalogue(model)}
            dense = plan(model, self.recipe).trainable
        wrong = [n for n in dense if parts[n] not in TRAINABLE_PARTS]
        if wrong:
            raise RecipeError(f"moe: recipe {self.recipe!r} selects {wrong[0]}; the MoE baseline trains the MLP "
                              "copy, so its recipe must select MLP parts only (mlp, mlp_gate_up, mlp_down, ...)")
        return dense

    def check(self, model):
        self.dense_names(model)

    def select(self, model):
        chosen = {n.replace(".mlp.", ".mlp.experts.1.", 1) for n in self.dense_names(model)}
        model.requires_grad_(False)
        names, params = [], []
        for n, p in model.named_parameters():
            if n in chosen or ".mlp.router." in n:
                p.requires_grad_(True)
                names.append(n)
                params.append(p)
        return model, AppliedRecipe(recipe=f"moe+{self.recipe}", spec=self.recipe, trainable=names,
                                    trainable_params=sum(p.numel() for p in params),
                                    total_params=sum(p.numel() for p in model.parameters()),
                                    groups=[{"name": "default", "params": params, "names": names}])

    def finish(self, model, ctx: StageContext, trainable, state):
        tensors, n_layers = moe_tensors(model), len(decoder_layers(model))
        with dense_view(model):  # the originals never train, so the plain part is the base's (delta: no tensors)
            save_model(model, ctx, ctx.path, [], extra=lambda folder: write_moe(folder, tensors, n_layers))
