"""Baseline training methods, each one small module hooked into the sequential loop (see base.Method).

    lora     PEFT LoRA adapters on the recipe's Linear modules of the LM decoder layers (base frozen)
    lwf      Learning without Forgetting: CE + lambda * T^2 * KL(teacher || student), teacher = previous stage
    wise_ft  after each stage theta = alpha * theta_prev + (1 - alpha) * theta_ft
    moe      each LM layer's MLP -> two experts (original frozen, trainable copy) + a token-level router

A run names its method in `recipe` (`lwf`, or `lwf+sa_proj` to pair it with a parameter recipe) or in the
`method` key (then `recipe` is the parameter recipe). Without a recipe of its own, every method tunes the
LM's MLP (recipe `mlp`), as the study did. Data-hybrid training (`mix.*`) and a low learning rate are
settings that combine with any method; see docs/baselines.md.
"""
from __future__ import annotations

from ..config import ConfigError
from .base import Method, StageContext, save_model
from .lora import LoRA
from .lwf import LwF
from .moe import MoE
from .wise_ft import WiSEFT

METHODS: dict[str, type[Method]] = {m.name: m for m in (LoRA, LwF, WiSEFT, MoE)}

__all__ = ["METHODS", "Method", "StageContext", "build", "label", "resolve", "save_model"]


def resolve(cfg: dict) -> tuple[str | None, str]:
    """(method name or None, parameter recipe) from the config's `method` and `recipe`."""
    recipe, method = cfg["recipe"], cfg.get("method")
    head, plus, rest = recipe.partition("+")
    if head in METHODS:
        if method not in (None, head):
            raise ConfigError(f"recipe {recipe!r} names method {head!r} but the config's method is {method!r}")
        method, recipe = head, rest
        if plus and not rest:
            raise ConfigError(f"recipe {cfg['recipe']!r}: nothing after '+' (e.g. {head}+sa_proj)")
    if method is not None and not recipe:
        recipe = METHODS[method].default_recipe
    return method, recipe


def label(cfg: dict) -> str:
    """What run.json's `recipe` records: METHOD (with its default recipe) or METHOD+RECIPE or RECIPE, then
    +hybrid when data is mixed in and +TAG when the config has a tag."""
    method, recipe = resolve(cfg)
    if method is None:
        name = recipe
    else:
        name = method if recipe == METHODS[method].default_recipe else f"{method}+{recipe}"
    if cfg["mix"]["share"] > 0:
        name += "+hybrid"
    if cfg.get("tag"):
        name += f"+{cfg['tag']}"
    return name


def build(cfg: dict) -> Method:
    method, recipe = resolve(cfg)
    return (METHODS[method] if method else Method)(cfg, recipe)
