"""One training stage: fine-tune a model on one task's data with one recipe.

AdamW over the recipe's parameter groups (`lr`, and `vision_lr` for the vision tower), warmup then cosine
(or another transformers schedule), gradient accumulation, epochs or max_steps, gradient clipping, a seeded
data order, bf16 autocast and gradient checkpointing on GPU only. Multi-GPU runs go through accelerate
(`accelerate launch -m training.run ...`); a single CPU process needs no launcher.

Loss: cross-entropy on answer and end-of-turn tokens only, summed over every such token of an optimizer
step (all micro-batches, all processes) and divided by their number, so a step's gradient does not depend
on how the examples are split into micro-batches or processes.

Reproducibility: a stage's data order and RNG depend only on (seed, stage index), so a stage trained in a
fresh process (a resumed run) gives the same weights as one trained after earlier stages.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset
from tqdm.auto import tqdm

from .config import defaults
from .recipes import apply_recipe


def seed_for(seed: int, stage: int, epoch: int | None = None) -> int:
    """A 32-bit seed derived from (seed, stage[, epoch]) only."""
    key = [seed, stage] + ([epoch] if epoch is not None else [])
    return int(np.random.SeedSequence(key).generate_state(1)[0])


class EpochShuffle(Sampler[int]):
    """A permutation of range(n) that depends only on (seed, stage, epoch)."""

    def __init__(self, n: int, seed: int, stage: int):
        self.n, self.seed, self.stage, self.epoch = n, seed, stage, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(seed_for(self.seed, self.stage, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedShuffle(EpochShuffle):
    """`train.group_by_length`: an EpochShuffle whose micro-batches hold examples of similar length, so
    little of a batch is padding (as transformers' Trainer does it). The epoch's permutation is cut into
    mega-batches of MEGA micro-batches, each sorted by length and cut into micro-batches, which are then
    shuffled (short ones last); every index still occurs once per epoch and the order depends only on (seed, stage, epoch)."""

    MEGA = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, stage: int):
        super().__init__(len(lengths), seed, stage)
        self.lengths, self.batch_size = list(lengths), batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(seed_for(self.seed, self.stage, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        size = self.MEGA * self.batch_size
        batches = []
        for i in range(0, self.n, size):
            mega = sorted(perm[i:i + size], key=lambda k: -self.lengths[k])  # stable: ties keep their draw
            batches += [mega[j:j + self.batch_size] for j in range(0, len(mega), self.batch_size)]
        # the DataLoader cuts this stream every batch_size indices: a short batch must come last
        full = [b for b in batches if len(b) == self.batch_size]
        order = torch.randperm(len(full), generator=g).tolist()
        return iter([k for b in order for k in full[b]] + [k for b in batches if len(b) < self.batch_size for k in b])


def example_lengths(dataset: Dataset) -> list[int]:
    """Per example, the length that `group_by_length` sorts on: the dataset's own `lengths()` (through
    ConcatDataset and Subset, which training.mixing builds)."""
    if isinstance(dataset, ConcatDataset):
        return [n for d in dataset.datasets for n in example_lengths(d)]
    if isinstance(dataset, Subset):
        inner = example_lengths(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if not hasattr(dataset, "lengths"):
        raise ValueError(f"train.group_by_length: {type(dataset).__name__} has no lengths(); "
                         "set train.group_by_length=false")
    return list(dataset.lengths())


def settings(train_cfg: dict) -> dict:
    """The `train.*` settings with the schema's defaults (training/config.py) under any key not given."""
    return defaults()["train"] | train_cfg


def make_accelerator(train_cfg: dict, cpu: bool | None = None, project_dir=None):
    """The Accelerator of a run: bf16 only where there is a GPU and the config asks for it; with
    `train.log_with`, its trackers write under `project_dir` (training.trackers)."""
    from accelerate import Accelerator

    from .trackers import require

    cfg = settings(train_cfg)
    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    tracking = {}
    if cfg["log_with"]:
        require(cfg["log_with"])
        tracking = {"log_with": cfg["log_with"], "project_dir": str(project_dir)}
    return Accelerator(cpu=cpu, mixed_precision="bf16" if cfg["bf16"] and not cpu else "no",
                       gradient_accumulation_steps=int(cfg["grad_accum"]), **tracking)


class StageHooks:
    """What the loop calls, in this order, on a training method and on the drift monitor (all optional):

        on_stage_start(stage, model)                   after accelerate's prepare: the model the stage starts from
        on_step(step, model, optimizer, scheduler)     after each optimizer step but the last; True ends the stage
        on_stage_end(steps, model) -> dict | None      after the last step: a train_log.jsonl record, if any
    `model` is the unwrapped model on its device."""

    def on_stage_start(self, stage: int, model: torch.nn.Module) -> None:
        pass

    def on_step(self, step: int, model: torch.nn.Module, optimizer, scheduler) -> bool:
        return False

    def on_stage_end(self, steps: int, model: torch.nn.Module) -> dict | None:
        return None


@dataclass
class StageResult:
    steps: int
    examples: int
    seconds: float
    trainable: list[str]
    losses: list[float] = field(default_factory=list)
    model: torch.nn.Module | None = None     # as prepared by accelerate (wrapped under DDP / FSDP / DeepSpeed)

    @property
    def step_seconds(self) -> float:
        return self.seconds / max(self.steps, 1)


# -- builders ------------------------------------------------------------------------------------------
def build_optimizer(applied, cfg: dict) -> torch.optim.Optimizer:
    """AdamW over the recipe's parameter groups: `lr`, and `vision_lr` for the vision tower."""
    lr = float(cfg["lr"])
    vision_lr = float(cfg["vision_lr"]) if cfg["vision_lr"] is not None else lr
    groups = [{"params": g["params"], "lr": vision_lr if g["name"] == "vision" else lr} for g in applied.groups]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=float(cfg["weight_decay"]), betas=tuple(cfg["adam_betas"]),
                             eps=float(cfg["adam_eps"]))


def build_loader(dataset: Dataset, collate_fn: Callable, cfg: dict, seed: int, stage: int,
                 num_workers: int = 0) -> DataLoader:
    """Micro-batches in an order that depends only on (seed, stage, epoch) (its sampler is an EpochShuffle,
    length-grouped with `group_by_length`)."""
    sampler = (LengthGroupedShuffle(example_lengths(dataset), int(cfg["batch_size"]), seed, stage)
               if cfg.get("group_by_length") else EpochShuffle(len(dataset), seed, stage))
    return DataLoader(dataset, batch_size=int(cfg["batch_size"]), sampler=sampler,
                      collate_fn=collate_fn, num_workers=num_workers, drop_last=False)


def stage_steps(cfg: dict, batches: int, desc: str) -> int:
    """Optimizer steps of the stage: `max_steps`, else `epochs` passes over `batches` micro-batches."""
    per_epoch = math.ceil(batches / int(cfg["grad_accum"]))
    total = int(cfg["max_steps"]) if cfg["max_steps"] else math.ceil(float(cfg["epochs"]) * per_epoch)
    if total < 1:
        raise ValueError(f"{desc}: zero optimizer steps (train.epochs={cfg['epochs']}, "
                         f"train.max_steps={cfg['max_steps']})")
    return total


def build_scheduler(optimizer, cfg: dict, total: int):
    """Warmup then `scheduler` (cosine by default), built on the raw optimizer (accelerate wraps it) and
    stepped once per optimizer step, whatever the process count."""
    from transformers import get_scheduler

    raw = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    return get_scheduler(cfg["scheduler"], raw, num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * total),
                         num_training_steps=total)


# -- the stage -----------------------------------------------------------------------------------------
def _windows(it, size: int):
    window = []
    for batch in it:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _supervised(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())  # the model shifts labels left by one


def _backward(model, window: list[dict], accelerator, method, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward of one optimizer step's micro-batches: (summed loss, summed method term, the
    step's supervised-token count over every process)."""
    n_tok = accelerator.reduce(torch.tensor(sum(_supervised(b) for b in window), device=accelerator.device), "sum")
    n_tok = max(int(n_tok), 1)
    # accelerator.backward divides by gradient_accumulation_steps (DeepSpeed's engine does the same) and DDP
    # averages over processes; our loss is already a mean over the whole step, so undo both.
    scale = accelerator.num_processes * grad_accum
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    step_loss = torch.zeros((), device=accelerator.device)
    step_aux = torch.zeros((), device=accelerator.device)
    for j, batch in enumerate(window):
        last = j == len(window) - 1
        if deepspeed:  # tells the engine whether this backward ends the step
            accelerator.gradient_state._set_sync_gradients(last)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            out = model(**batch, num_items_in_batch=n_tok)
            loss = out.loss
            aux = method.extra_loss(batch, out, n_tok) if method is not None else None
            if aux is not None:
                loss = loss + aux
                step_aux += aux.detach()
            accelerator.backward(loss * scale)
        step_loss += loss.detach()
    return step_loss, step_aux, n_tok


def _update(optimizer, scheduler, accelerator, groups: list[dict], max_norm: float) -> tuple:
    """Clip, step the optimizer and the schedule: (gradient norm, this step's learning rate per group)."""
    grad_norm = accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], max_norm)
    lrs = {g["name"]: pg["lr"] for g, pg in zip(groups, optimizer.param_groups)}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lrs


def train_stage(model: torch.nn.Module, dataset: Dataset, collate_fn: Callable, train_cfg: dict, *, seed: int,
                stage: int, recipe: str | None = None, method=None, hooks: Sequence[StageHooks] = (),
                accelerator=None, num_workers: int = 0, log: Callable[[dict], None] | None = None,
                desc: str = "") -> StageResult:
    """Train `model` in place on `dataset`; returns the steps, losses and timing. What trains: `method`
    (training.methods.Method: it may wrap the model, the result's `model` is what trained, and add a term
    to the loss), else `recipe`. The method and `hooks` (the drift monitor) see the stage's start, every
    step and its end (StageHooks)."""
    cfg = settings(train_cfg)
    ga = int(cfg["grad_accum"])
    accelerator = accelerator or make_accelerator(cfg)
    if len(dataset) == 0:
        raise ValueError(f"{desc or 'stage'}: no training examples")
    torch.manual_seed(seed_for(seed, stage))
    # after seeding: a method's new tensors (LoRA's A) are part of the stage's RNG
    model, applied = method.select(model) if method is not None else (model, apply_recipe(model, recipe))
    hooks = [method, *hooks] if method is not None else list(hooks)
    optimizer = build_optimizer(applied, cfg)
    loader = build_loader(dataset, collate_fn, cfg, seed, stage, num_workers)
    sampler = loader.sampler
    checkpointing = accelerator.device.type == "cuda" and cfg["gradient_checkpointing"]
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for h in hooks:
        h.on_stage_start(stage, accelerator.unwrap_model(model))
    total = stage_steps(cfg, len(loader), desc or "stage")
    scheduler = build_scheduler(optimizer, cfg, total)
    max_norm = cfg["max_grad_norm"] if cfg["max_grad_norm"] is not None else float("inf")
    bar = tqdm(total=total, desc=desc or f"stage {stage}", leave=False, dynamic_ncols=True,
               disable=not (cfg["progress"] and accelerator.is_local_main_process))
    losses: list[float] = []
    aux_name = getattr(method, "aux_name", None)
    step = epoch = examples = 0
    stopped = False
    start = time.perf_counter()
    while step < total and not stopped:
        sampler.set_epoch(epoch)
        for window in _windows(iter(loader), ga):
            t0 = time.perf_counter()
            step_loss, step_aux, n_tok = _backward(model, window, accelerator, method, ga)
            examples += sum(int(b["input_ids"].shape[0]) for b in window) * accelerator.num_processes
            grad_norm, lrs = _update(optimizer, scheduler, accelerator, applied.groups, max_norm)
            step += 1
            loss = float(accelerator.reduce(step_loss, "sum"))  # sum over processes of local-sum / global count
            if aux_name:  # the method's own term, included in `loss`
                aux_loss = float(accelerator.reduce(step_aux, "sum"))
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if log is not None and (step % int(cfg["log_every"]) == 0 or step == total):
                log({"step": step, "epoch": epoch, "loss": loss, "lr": lrs.get("default"), "vision_lr": lrs.get("vision"),
                     "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": n_tok,
                     "seconds": round(time.perf_counter() - t0, 5), **({aux_name: aux_loss} if aux_name else {})})
            if step >= total:
                break
            unwrapped = accelerator.unwrap_model(model)
            if any([h.on_step(step, unwrapped, optimizer, scheduler) for h in hooks]):   # every hook sees the step
                stopped = True                           # e.g. the drift budget ended the stage
                break
        epoch += 1
    bar.close()
    for h in hooks:
        record = h.on_stage_end(step, accelerator.unwrap_model(model))
        if record is not None and log is not None:
            log(record)
    seconds = time.perf_counter() - start
    if checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_disable()
    return StageResult(steps=step, examples=examples, seconds=seconds, trainable=applied.trainable, losses=losses,
                       model=model)


def full_state_dict(accelerator, model) -> dict | None:
    """The whole state dict, gathered to the main process, where parameters are sharded (FSDP, ZeRO-3);
    None where the unwrapped model already holds every weight."""
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return accelerator.get_state_dict(model)
    return None
