"""Training curves where users look: `train.log_with=tensorboard|wandb` sends the training loss, the learning
rates and the drift monitor's values through accelerate's trackers (TensorBoard event files under the run
directory; a W&B run named after it). RUN/train_log.jsonl is written either way.

Both are optional extras: without the package, `train.log_with` stops the run before it starts with an error
naming it. The step axis counts optimizer steps from the run's first stage (a resumed run continues it).
"""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

from .config import ConfigError

# tracker -> the import names accelerate accepts for it (the first is the one to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def require(log_with: str | None) -> None:
    """A clear error when the tracker's package is not installed."""
    if log_with is None:
        return
    names = PACKAGES[log_with]
    if not any(find_spec(n) for n in names):
        raise ConfigError(f"train.log_with={log_with} needs the {names[0]!r} package, which is not installed "
                          f"(pip install {names[0]}); or leave train.log_with unset (train_log.jsonl only)")


def _hparams(cfg: dict, prefix: str = "") -> dict:
    """The config flattened to scalars (what every tracker accepts)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


class Curves:
    """The run's trackers (accelerator.init_trackers on `out`); `stage(k, steps_before)` moves the step axis."""

    def __init__(self, accelerator, out: Path, cfg: dict):
        self.accelerator, self.offset, self.stage_index = accelerator, 0, 0
        accelerator.init_trackers(Path(out).name, config=_hparams(cfg))

    def stage(self, index: int, steps_before: int) -> None:
        self.stage_index, self.offset = index, steps_before

    def train(self, record: dict) -> None:
        """A train_log.jsonl record: optimizer-step records become train/loss, train/lr (train/vision_lr)."""
        if "loss" not in record or "step" not in record:
            return
        values = {"train/loss": record["loss"], "train/stage": self.stage_index}
        values |= {f"train/{k}": record[k] for k in ("lr", "vision_lr", "grad_norm") if record.get(k) is not None}
        self.accelerator.log(values, step=self.offset + int(record["step"]))

    def monitor(self, stage: int, step: int, values: dict) -> None:
        """One monitor check: monitor/PROBE = its mean over the captions."""
        self.accelerator.log({f"monitor/{p}": v["mean"] for p, v in values.items()}, step=self.offset + step)

    def close(self) -> None:
        self.accelerator.end_training()


def steps_before(log_path: Path, stage: int) -> int:
    """Optimizer steps of the stages before `stage`, from train_log.jsonl's stage_end records."""
    if not log_path.is_file():
        return 0
    records = (json.loads(line) for line in log_path.read_text().splitlines() if line.strip())
    return sum(int(r["steps"]) for r in records if r.get("event") == "stage_end" and r.get("stage", 0) < stage)
