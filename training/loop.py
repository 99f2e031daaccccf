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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


def make_accelerator(train_cfg: dict, cpu: bool | None = None):
    """The Accelerator of a run: bf16 only where there is a GPU and the config asks for it."""
    from accelerate import Accelerator

    cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    bf16 = train_cfg.get("bf16", True) and not cpu
    return Accelerator(cpu=cpu, mixed_precision="bf16" if bf16 else "no",
                       gradient_accumulation_steps=int(train_cfg.get("grad_accum", 1)))


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


def train_stage(model: torch.nn.Module, dataset: Dataset, collate_fn: Callable, train_cfg: dict, *,
                recipe: str, seed: int, stage: int, accelerator=None, num_workers: int = 0,
                log: Callable[[dict], None] | None = None, desc: str = "", method=None, monitor=None) -> StageResult:
    """Train `model` in place on `dataset` with `recipe`; returns the steps, losses and timing.
    `method` (training.methods.Method) may choose the trainable tensors itself (and wrap the model: the
    result's `model` is what trained) and add a term to the loss (`method.extra_loss`)."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    accelerator = accelerator or make_accelerator(train_cfg)
    cfg = train_cfg
    if len(dataset) == 0:
        raise ValueError(f"{desc or 'stage'}: no training examples")
    torch.manual_seed(seed_for(seed, stage))
    if method is not None:  # after seeding: a method's new tensors (LoRA's A) are part of the stage's RNG
        model, applied = method.select(model)
    else:
        applied = apply_recipe(model, recipe)
    lr = float(cfg["lr"])
    vision_lr = float(cfg["vision_lr"]) if cfg.get("vision_lr") is not None else lr
    groups = [{"params": g["params"], "lr": vision_lr if g["name"] == "vision" else lr} for g in applied.groups]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=float(cfg["weight_decay"]),
                                  betas=tuple(cfg.get("adam_betas", (0.9, 0.999))), eps=float(cfg.get("adam_eps", 1e-8)))
    sampler = EpochShuffle(len(dataset), seed, stage)
    loader = DataLoader(dataset, batch_size=int(cfg["batch_size"]), sampler=sampler, collate_fn=collate_fn,
                        num_workers=num_workers, drop_last=False)
    on_gpu = accelerator.device.type == "cuda"
    if on_gpu and cfg.get("gradient_checkpointing", True):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if monitor is not None:  # training.monitor.DriftMonitor: the model the stage starts from, on its device
        monitor.start_stage(stage, accelerator.unwrap_model(model))

    ga = int(cfg["grad_accum"])
    per_epoch = math.ceil(len(loader) / ga)
    total = int(cfg["max_steps"]) if cfg.get("max_steps") else math.ceil(float(cfg["epochs"]) * per_epoch)
    if total < 1:
        raise ValueError(f"{desc or 'stage'}: zero optimizer steps (train.epochs={cfg['epochs']}, "
                         f"train.max_steps={cfg.get('max_steps')})")
    # The schedule is built on the raw optimizer and stepped once per optimizer step, whatever the process count.
    scheduler = get_scheduler(cfg.get("scheduler", "cosine"), optimizer.optimizer if hasattr(optimizer, "optimizer")
                              else optimizer, num_warmup_steps=math.ceil(float(cfg["warmup_ratio"]) * total),
                              num_training_steps=total)
    params = [p for g in applied.groups for p in g["params"]]
    max_norm = cfg.get("max_grad_norm")
    deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
    # accelerator.backward divides by gradient_accumulation_steps (DeepSpeed's engine does the same) and DDP
    # averages over processes; our loss is already a mean over the whole step, so undo both.
    scale = accelerator.num_processes * ga
    bar = tqdm(total=total, desc=desc or f"stage {stage}", disable=not (cfg.get("progress", True)
                                                                         and accelerator.is_local_main_process),
               leave=False, dynamic_ncols=True)
    losses: list[float] = []
    aux_name = getattr(method, "aux_name", None)
    step = epoch = examples = 0
    start = time.perf_counter()
    while step < total:
        sampler.set_epoch(epoch)
        for window in _windows(iter(loader), ga):
            t0 = time.perf_counter()
            n_tok = accelerator.reduce(torch.tensor(sum(_supervised(b) for b in window), device=accelerator.device),
                                       "sum")
            n_tok = max(int(n_tok), 1)
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
                examples += int(batch["input_ids"].shape[0]) * accelerator.num_processes
            grad_norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            lrs = {g["name"]: pg["lr"] for g, pg in zip(applied.groups, optimizer.param_groups)}  # this step's
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = float(accelerator.reduce(step_loss, "sum"))  # sum over processes of local-sum / global count
            if aux_name:  # the method's own term, included in `loss`
                aux_loss = float(accelerator.reduce(step_aux, "sum"))
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if log is not None and (step % int(cfg.get("log_every", 1)) == 0 or step == total):
                record = {"step": step, "epoch": epoch, "loss": loss, "lr": lrs.get("default"),
                          "vision_lr": lrs.get("vision"),
                          "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens": n_tok,
                          "seconds": round(time.perf_counter() - t0, 5)}
                if aux_name:
                    record[aux_name] = aux_loss
                log(record)
            if step >= total:
                break
            if monitor is not None and monitor.after_step(step, accelerator.unwrap_model(model), optimizer, scheduler):
                break                                   # the drift budget ended the stage
        if monitor is not None and monitor.stopped:
            break
        epoch += 1
    bar.close()
    if monitor is not None:
        checks = monitor.end_stage(step, accelerator.unwrap_model(model))
        if log is not None:
            log({"event": "monitor", **checks})
    seconds = time.perf_counter() - start
    if on_gpu and cfg.get("gradient_checkpointing", True):
        accelerator.unwrap_model(model).gradient_checkpointing_disable()
    return StageResult(steps=step, examples=examples, seconds=seconds, trainable=applied.trainable, losses=losses,
                       model=model)


def full_state_dict(accelerator, model) -> dict | None:
    """The whole state dict, gathered to the main process, where parameters are sharded (FSDP, ZeRO-3);
    None where the unwrapped model already holds every weight."""
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return accelerator.get_state_dict(model)
    return None
