"""What a training method can change in the sequential loop, and plain fine-tuning as the default.

The loop (training.run + training.loop.train_stage) calls these hooks, in this order, for stage k:

    model = method.load(prev_stage_folder, opts)  # the model stage k starts from
    method.begin_stage(model, ctx)                # e.g. LwF's frozen teacher, WiSE-FT's copy of theta_prev
    model, applied = method.select(model)         # inside train_stage, after seeding: what trains
    method.on_stage_start / on_step / on_stage_end  # inside train_stage (training.loop.StageHooks), as the
                                                  # drift monitor's
    loss = CE + method.extra_loss(...)            # per micro-batch (LwF's distillation term), or CE alone
    method.finish(model, ctx, trainable, state)   # write the stage folder (and any variant folder)
    method.end_stage()                            # drop what begin_stage kept

A method is one small module in training/methods/ that overrides only what it needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoints
from ..loop import StageHooks
from ..recipes import AppliedRecipe, apply_recipe, plan


@dataclass
class StageContext:
    """Where stage `index` (trained on `task`) starts from and what it writes."""
    index: int
    task: str
    prev: Path                 # the previous stage's folder
    path: Path                 # this stage's folder
    run_dir: Path
    stage0: Path               # RUN/stage-00-base
    base: Path                 # the run's base checkpoint (a full folder)
    family: Any
    processor: Any
    save: str                  # "full" or "delta"
    accelerator: Any = None

    def variant_path(self, variant: str) -> Path:
        """This stage's folder in a variant run directory (RUN/VARIANT/stage-NN-TASK)."""
        return self.run_dir / variant / self.path.name


def save_model(model: nn.Module, ctx: StageContext, path: Path, trainable: list[str], state: dict | None = None,
               extra=None) -> None:
    """A full folder or a delta over the run's base (config `save`), as plain fine-tuning writes them."""
    if ctx.save == "delta":
        checkpoints.save_delta(model, ctx.processor, path, ctx.base, trainable, ctx.family, state_dict=state,
                               extra=extra)
    else:
        checkpoints.save_full(model, ctx.processor, path, state_dict=state, extra=extra)


class Method(StageHooks):
    """Plain fine-tuning of the recipe's tensors with cross-entropy. The loop also calls the StageHooks
    (training.loop) of a method, as of the drift monitor: all no-ops here."""
    name: str | None = None
    default_recipe = "full"
    variants: tuple[str, ...] = ()   # sibling run directories a method may write (RUN/VARIANT/)
    sharded_ok = True               # works where weights are sharded (FSDP, DeepSpeed)
    aux_name: str | None = None      # train_log.jsonl key of the extra_loss term (part of "loss")

    def __init__(self, cfg: dict, recipe: str):
        self.cfg, self.recipe = cfg, recipe

    def active_variants(self) -> tuple[str, ...]:
        """The variant folders this run writes (a subset of `variants`, per config)."""
        return ()

    def train_config(self, train_cfg: dict) -> dict:
        """The `train` settings the stage uses (LoRA has its own learning rate)."""
        return train_cfg

    def check(self, model: nn.Module) -> None:
        """Refuse, before anything is written, a recipe this method cannot take on this architecture
        (`model` may live on the meta device)."""
        plan(model, self.recipe)

    def load(self, path: str | os.PathLike, opts: checkpoints.LoadOptions) -> nn.Module:
        return checkpoints.load_model(path, opts)

    def begin_stage(self, model: nn.Module, ctx: StageContext) -> None:
        pass

    def select(self, model: nn.Module) -> tuple[nn.Module, AppliedRecipe]:
        return model, apply_recipe(model, self.recipe)

    def extra_loss(self, batch: dict, out, n_tok: int) -> torch.Tensor | None:
        """A term added to the step's loss, already divided by the step's supervised-token count `n_tok`."""
        return None

    def finish(self, model: nn.Module, ctx: StageContext, trainable: list[str], state: dict | None) -> None:
        save_model(model, ctx, ctx.path, trainable, state)

    def end_stage(self) -> None:
        """Drop whatever begin_stage kept (teacher, snapshots)."""
