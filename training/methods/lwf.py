"""Learning without Forgetting: distil the previous stage's model while learning the current task.

    loss = CE + lambda * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))

The teacher is a frozen copy of the model the stage starts from (the previous stage's checkpoint). The KL is
summed over the positions the cross-entropy uses (those that predict the current examples' answer and
end-of-turn tokens) and divided by the same token count, so both terms are per-token means over the
optimizer step. The teacher's logits are computed only at those positions: its last hidden states are
gathered there and only then go through its lm_head. The term is never skipped: running out of memory
raises with a message (the study's code silently dropped it).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from .base import Method, StageContext

IGNORE_INDEX = -100


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: position i predicts token i+1, which is supervised."""
    return labels[:, 1:] != IGNORE_INDEX


def teacher_logits(teacher, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """(n, V) logits of `teacher` at the True positions of `mask` (B, T-1), without full-vocabulary logits
    anywhere else."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = teacher.model(**inputs).last_hidden_state[:, :-1][mask]
    return teacher.get_output_embeddings()(hidden)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


class LwF(Method):
    name = "lwf"
    default_recipe = "mlp"
    aux_name = "distill"

    def __init__(self, cfg, recipe):
        super().__init__(cfg, recipe)
        self.lam = float(cfg["lwf"]["lambda"])
        self.temperature = float(cfg["lwf"]["temperature"])
        self.teacher = None
        self.accelerator = None

    def begin_stage(self, model, ctx: StageContext):
        self.set_teacher(copy.deepcopy(model), ctx.accelerator)

    def set_teacher(self, teacher, accelerator=None):
        teacher.eval().requires_grad_(False)
        if accelerator is not None:
            teacher.to(accelerator.device)
        self.teacher, self.accelerator = teacher, accelerator

    def extra_loss(self, batch, out, n_tok):
        if self.teacher is None:
            raise RuntimeError("lwf: no teacher; begin_stage (or set_teacher) must run before training")
        mask = answer_positions(batch["labels"])
        student = out.logits[:, :-1][mask]
        autocast = self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()
        try:
            with torch.no_grad(), autocast:
                teacher = teacher_logits(self.teacher, batch, mask)
        except torch.OutOfMemoryError as e:
            raise RuntimeError(f"lwf: out of memory computing the teacher's logits for a micro-batch of "
                               f"{batch['input_ids'].shape[0]} examples ({int(mask.sum())} answer positions); "
                               "the distillation term is never dropped: lower train.batch_size (raise "
                               "train.grad_accum to keep the effective batch)") from e
        kl = distillation(student, teacher, self.temperature)
        return self.lam * self.temperature ** 2 * kl / n_tok

    def end_stage(self):
        self.teacher = None
