"""Run configs: a YAML file from `training/configs/` (or any path) plus `key=value` overrides, torchtune style.

    cfg = load_config("toy-tiny", ["train.lr=1e-3", "tasks=[cub200,pixmocount]", "data.tasks.cub200.train=/x.json"])
    cfg["train"]["lr"]   # 0.001

Every key is declared in SCHEMA with its type and default; an unknown key (in the file or an override) is an
error naming the key. Override values are parsed as YAML (`3` int, `1e-3` float, `[a, b]` list, `null`).
`data.tasks` is an open map (task name -> {train, test, images}); its entries' keys are checked.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad config file, key or value; the message names it."""


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any = None
    nullable: bool = False
    choices: tuple = ()
    doc: str = ""
    min: float | None = None  # smallest allowed value of a number


SCHEMA: dict[str, Key] = {
    "family": Key(str, None, True, doc="model family; inferred from the base checkpoint when null"),
    "base": Key(str, None, True, doc="stage-0 checkpoint folder, or world:FAMILY:SIZE (the embedded world's)"),
    "recipe": Key(str, "full", doc="named recipe or spec (training.recipes); --recipe overrides"),
    "tasks": Key(list, [], doc="task names, trained in this order; stage k trains tasks[k-1]"),
    "seed": Key(int, 0, doc="data order and initialisation of stage k depend only on (seed, k)"),
    "save": Key(str, "full", choices=("full", "delta"), doc="full HF folders, or only the recipe's tensors"),
    "out": Key(str, None, True, doc="run directory; --out overrides; default runs/CONFIG-RECIPE"),
    "model.dtype": Key(str, "float32", choices=("float32", "bfloat16", "float16"),
                       doc="weights while training (float32 keeps full-precision master weights; bf16 autocast on GPU)"),
    "model.attn_implementation": Key(str, None, True, doc="e.g. sdpa, flash_attention_2 (GPU)"),
    "data.root": Key(str, None, True, doc="'world' / 'world:SIZE', or a folder with world.json or tasks/NAME/train.json + images/"),
    "data.images": Key(str, None, True, doc="image root for every task (default: ROOT/images)"),
    "data.max_examples": Key(int, None, True, min=1, doc="use at most the first N records of each task"),
    "data.num_workers": Key(int, 0, min=0, doc="DataLoader worker processes"),
    "data.tasks": Key(dict, {}, doc="per-task files: NAME: {train: PATH, test: PATH, images: DIR}"),
    "train.lr": Key(float, 1e-5, min=0, doc="learning rate of every trainable tensor outside the vision tower"),
    "train.vision_lr": Key(float, None, True, min=0, doc="learning rate of the vision tower (default: train.lr)"),
    "train.weight_decay": Key(float, 0.0, min=0),
    "train.adam_betas": Key(list, [0.9, 0.999]),
    "train.adam_eps": Key(float, 1e-8),
    "train.epochs": Key(float, 1.0, min=0, doc="passes over each task's data (ignored when max_steps is set)"),
    "train.max_steps": Key(int, None, True, min=1, doc="optimizer steps per stage; overrides epochs"),
    "train.batch_size": Key(int, 8, min=1, doc="examples per micro-batch per process"),
    "train.grad_accum": Key(int, 1, min=1, doc="micro-batches per optimizer step"),
    "train.scheduler": Key(str, "cosine", choices=("cosine", "linear", "constant_with_warmup", "constant")),
    "train.group_by_length": Key(bool, False, doc="micro-batches of examples of similar length (less padding; "
                                 "a different data order): the world's pretraining"),
    "train.warmup_ratio": Key(float, 0.03, min=0, doc="fraction of the stage's optimizer steps spent warming up"),
    "train.max_grad_norm": Key(float, 1.0, True, min=0, doc="gradient clipping; null disables"),
    "train.bf16": Key(bool, True, doc="bf16 autocast; applies on GPU only"),
    "train.gradient_checkpointing": Key(bool, True, doc="applies on GPU only"),
    "train.log_every": Key(int, 1, min=1, doc="write a train_log.jsonl line every N optimizer steps"),
    "train.progress": Key(bool, True, doc="tqdm progress bars"),
    "train.log_with": Key(str, None, True, choices=("tensorboard", "wandb"),
                          doc="also send loss, LR and the monitor's values to TensorBoard / W&B (training.trackers)"),
    # The drift monitor (training/monitor.py): probes of the model being trained, into RUN/monitor.parquet.
    "monitor.every": Key(int, 0, min=0, doc="probe the model every N optimizer steps (and at each stage's start and "
                         "end); 0: off"),
    "monitor.captions": Key(int, 16, min=1, doc="how many captions (the first N of the run's caption set)"),
    "monitor.batch_size": Key(int, 16, min=1, doc="captions per forward pass of a check"),
    "monitor.signatures": Key(bool, True, doc="also the run tasks' signature masses sig_<task>_mass"),
    "monitor.kl": Key(bool, True, doc="also kl_to_base and top1_agreement against stage 0"),
    "monitor.probe": Key(str, "number_mass", doc="the probe the drift budget watches"),
    "monitor.budget": Key(float, None, True, min=0, doc="largest allowed |probe - reference|; null: no budget"),
    "monitor.reference": Key(str, "base", choices=("base", "stage_start"), doc="the budget's reference value"),
    "monitor.on_budget": Key(str, "stop", choices=("stop", "lower_lr"), doc="end the stage, or scale its LR"),
    "monitor.lr_factor": Key(float, 0.5, min=0, doc="LR multiplier of on_budget: lower_lr"),
    "probe.captions": Key(str, None, True, doc="caption set (LLaVA JSON) for the probes; the world's for world runs"),
    "probe.images": Key(str, None, True, doc="image root of probe.captions"),
    "eval.benchmarks": Key(list, None, True, doc="benchmark names for probes.evaluate; the world's for world runs"),
    "eval.domains": Key(dict, {}, doc="2x2 tags: NAME: {image: DOMAIN, text: DOMAIN} (the world's are built in)"),
    "eval.presets": Key(dict, {}, doc="study benchmarks probes.evaluate reads from local copies and scores as "
                        "lmms-eval does: NAME: PATH (probes.presets; docs/benchmarks.md)"),
    "eval.profile": Key(str, "lmms-eval", choices=("study", "lmms-eval"),
                        doc="the presets' lmms-eval version: study (the paper's fork) or lmms-eval (current main)"),
    # Baselines (docs/baselines.md). A method is paired with the parameter recipe: `recipe: lwf` (its default
    # recipe, the LM's MLP), `recipe: lwf+sa_proj`, or `method: lwf` with `recipe: sa_proj`.
    "method": Key(str, None, True, choices=("lora", "lwf", "wise_ft", "moe"),
                  doc="lora|lwf|wise_ft|moe, or null (plain fine-tuning); or name it in recipe: METHOD[+RECIPE]"),
    "tag": Key(str, None, True, doc="appended to run.json's recipe as +TAG (e.g. lowlr), so analysis groups by it"),
    "lora.r": Key(int, 256, min=1, doc="LoRA rank (clamped to the smallest adapted matrix dimension)"),
    "lora.alpha": Key(float, 32.0, min=0, doc="LoRA alpha (scale alpha / r)"),
    "lora.dropout": Key(float, 0.05, min=0, doc="dropout on the LoRA branch's input"),
    "lora.lr": Key(float, 5e-5, True, min=0, doc="learning rate of the adapters (null: train.lr); the paper's 5e-5"),
    "lora.save_merged": Key(bool, False, doc="also write merged full models to RUN/merged/ (a run directory)"),
    "lwf.lambda": Key(float, 1.0, min=0, doc="weight of the distillation term"),
    "lwf.temperature": Key(float, 2.0, min=1e-6, doc="softmax temperature T of teacher and student (loss x T^2)"),
    "wise_ft.alpha": Key(float, 0.1, min=0, doc="weight of the previous stage: theta = alpha*prev + (1-alpha)*ft"),
    "wise_ft.keep_finetuned": Key(bool, False, doc="also keep each stage's un-merged model in RUN/finetuned/"),
    "mix.share": Key(float, 0.0, min=0, doc="data-hybrid: fraction of each stage's examples drawn from mix.sources"),
    "mix.sources": Key(list, ["previous"], doc="task names to mix in; 'previous' = the run's earlier tasks"),
}
TASK_KEYS = ("train", "test", "images")
SECTIONS = sorted({k.split(".")[0] for k in SCHEMA if "." in k})


def defaults() -> dict:
    cfg: dict = {}
    for key, spec in SCHEMA.items():
        _set(cfg, key.split("."), copy.deepcopy(spec.default))
    return cfg


def _set(d: dict, parts: list[str], value) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _coerce(key: str, value, where: str):
    spec = SCHEMA[key]
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"{where}: {key} cannot be null")
    t = spec.type
    if t is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML reads 5e-6 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if t is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if t is list and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, t) or (t in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} must be {t.__name__}, got {value!r}")
    if spec.min is not None and value < spec.min:
        raise ConfigError(f"{where}: {key} must be at least {spec.min}, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise ConfigError(f"{where}: {key} must be one of {', '.join(spec.choices)}, got {value!r}")
    if key == "data.tasks":
        value = {str(name): _task_entry(name, entry, where) for name, entry in value.items()}
    if key == "eval.domains":
        value = {str(name): _domain_entry(name, entry, where) for name, entry in value.items()}
    if key == "eval.presets" and not all(isinstance(v, str) and v for v in value.values()):
        raise ConfigError(f"{where}: eval.presets must map benchmark names to local paths, got {value!r}")
    if key == "mix.share" and value >= 1:
        raise ConfigError(f"{where}: mix.share must be below 1 (the current task's share is 1 - mix.share), "
                          f"got {value!r}")
    return value


def _domain_entry(name, entry, where: str) -> dict:
    if not (isinstance(entry, dict) and set(entry) == {"image", "text"}
            and all(isinstance(v, str) and v for v in entry.values())):
        raise ConfigError(f"{where}: eval.domains.{name} must be {{image: DOMAIN, text: DOMAIN}} (two names), "
                          f"got {entry!r}")
    return {"image": entry["image"], "text": entry["text"]}


def _task_entry(name, entry, where: str) -> dict:
    if entry is None:
        entry = {}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: data.tasks.{name} must be a mapping with keys {', '.join(TASK_KEYS)}")
    for k, v in entry.items():
        if k not in TASK_KEYS:
            raise ConfigError(f"{where}: unknown config key 'data.tasks.{name}.{k}' "
                              f"(a task entry takes {', '.join(TASK_KEYS)})")
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}: data.tasks.{name}.{k} must be a path string, got {v!r}")
    return {k: entry.get(k) for k in TASK_KEYS}


def _unknown(key: str, where: str) -> ConfigError:
    import difflib
    close = difflib.get_close_matches(key, list(SCHEMA), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(SCHEMA)}"
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def _flatten(d: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """Nested YAML mapping -> {dotted key: value}, stopping at declared keys (data.tasks is one value)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key in SCHEMA:
            out[key] = v
        elif isinstance(v, dict) and (key in SECTIONS or key.startswith(tuple(f"{s}." for s in SECTIONS))):
            out.update(_flatten(v, where, key + "."))
        else:
            raise _unknown(key, where)
    return out


def resolve_path(config: str | os.PathLike) -> Path:
    """A YAML path, or the name of a file in training/configs (`toy`, `toy-tiny.yaml`)."""
    p = Path(config)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(config)!r} not found (not a file, nor one of training/configs: {shipped})")


def apply(cfg: dict, key: str, value, where: str) -> None:
    """Set one dotted key (validated and coerced) in a nested config."""
    parts = key.split(".")
    if key in SCHEMA:
        _set(cfg, parts, _coerce(key, value, where))
    elif key.startswith("data.tasks.") and len(parts) in (3, 4):
        tasks = cfg["data"]["tasks"]
        if len(parts) == 3:  # data.tasks.NAME={train: ...}
            tasks[parts[2]] = _task_entry(parts[2], value, where)
        else:
            entry = tasks.setdefault(parts[2], dict.fromkeys(TASK_KEYS))
            entry.update(_task_entry(parts[2], {parts[3]: value}, where))
    else:
        raise _unknown(key, where)


def parse_override(text: str) -> tuple[str, Any]:
    key, eq, raw = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({e})") from None
    return key.strip(), value


def load_config(config: str | os.PathLike | None, overrides: list[str] = ()) -> dict:
    """Defaults <- YAML file <- overrides; every key and value checked."""
    cfg = defaults()
    if config is not None:
        path = resolve_path(config)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping")
        for key, value in _flatten(data, str(path)).items():
            apply(cfg, key, value, str(path))
    for text in overrides:
        key, value = parse_override(text)
        apply(cfg, key, value, f"override {text!r}")
    return cfg


def get(cfg: dict, key: str):
    d = cfg
    for p in key.split("."):
        d = d[p]
    return d


def describe() -> str:
    """One line per key: the reference printed by `python -m training.run --help-config`."""
    rows = []
    for key, spec in SCHEMA.items():
        t = spec.type.__name__ + ("|null" if spec.nullable else "")
        choices = f" ({'|'.join(spec.choices)})" if spec.choices else ""
        rows.append(f"  {key:<28} {t:<10} default {spec.default!r}{choices}  {spec.doc}")
    return "\n".join(rows)
