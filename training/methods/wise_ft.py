"""WiSE-FT between stages: interpolate the fine-tuned weights with the stage's starting weights.

After stage k is fine-tuned (theta_ft), every tensor the recipe trains becomes

    theta_k = alpha * theta_{k-1} + (1 - alpha) * theta_ft          (float32, in this order of operations)

and theta_k is the stage's checkpoint, from which stage k+1 starts. `wise_ft.alpha` is the weight of the
previous stage (the study: alpha 0.1 with MLP-only tuning, i.e. 90% of the fine-tuned weights). Tensors the
recipe does not train are unchanged by the formula and are not touched (bitwise the previous stage's).
With `wise_ft.keep_finetuned`, RUN/finetuned/ (a run directory) also keeps each stage's un-merged theta_ft.
"""
from __future__ import annotations

import torch

from ..config import ConfigError
from ..recipes import plan
from .base import Method, StageContext, save_model


def interpolate(prev: torch.Tensor, ft: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * prev + (1 - alpha) * ft, computed in float32 and returned in ft's dtype."""
    return (alpha * prev.float() + (1 - alpha) * ft.float()).to(ft.dtype)


class WiSEFT(Method):
    name = "wise_ft"
    default_recipe = "mlp"
    variants = ("finetuned",)
    sharded_ok = False

    def __init__(self, cfg, recipe):
        super().__init__(cfg, recipe)
        self.alpha = float(cfg["wise_ft"]["alpha"])
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"wise_ft.alpha must be in [0, 1], got {self.alpha}")
        self.prev: dict[str, torch.Tensor] = {}

    def active_variants(self):
        return ("finetuned",) if self.cfg["wise_ft"]["keep_finetuned"] else ()

    def begin_stage(self, model, ctx: StageContext):
        """Keep theta_{k-1} of the tensors the recipe will train (on the CPU)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        self.prev = {n: params[n].detach().to("cpu", copy=True) for n in plan(model, self.recipe).trainable}

    def merge(self, model) -> None:
        """theta = alpha * theta_prev + (1 - alpha) * theta, in place, once per tensor (tied names share one)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        done = set()
        with torch.no_grad():
            for n, prev in self.prev.items():
                p = params[n]
                if id(p) in done:
                    continue
                done.add(id(p))
                p.copy_(interpolate(prev, p.detach().cpu(), self.alpha).to(p.device))

    def finish(self, model, ctx: StageContext, trainable, state):
        if "finetuned" in self.active_variants():
            save_model(model, ctx, ctx.variant_path("finetuned"), trainable)
        self.merge(model)
        save_model(model, ctx, ctx.path, trainable)

    def end_stage(self):
        self.prev = {}
