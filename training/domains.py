"""The 2x2 tags of the second paper (arXiv 2603.14493): every task and benchmark has an image domain (what
kind of picture) and a text domain (what kind of question and answer). Relative to the task a stage tunes,
a benchmark is image-ID when its image domain equals the task's, else image-OOD; likewise for text. So a
benchmark falls in one of four cells per tuned task: the task's own test set is image-ID/text-ID; the same
pictures with other questions image-ID/text-OOD; the same questions on other pictures image-OOD/text-ID;
everything else image-OOD/text-OOD.

run.json records the tags as "domains": {NAME: {"image": DOMAIN, "text": DOMAIN}}; `analysis.cells` reads
them. Where they come from, first match wins: the config's `eval.domains`; the world.json task entries'
`image_domain` / `text_domain`; `WORLD_DOMAINS` below, for world runs (the embedded world's task names).
"""
from __future__ import annotations

from .records import DataRoot

# The embedded world's tasks (training/world/tasks.py): (image domain, text domain).
WORLD_DOMAINS: dict[str, tuple[str, str]] = {
    "cub200": ("birds", "species"),
    "pixmocount": ("shapes", "count"),
    "pathvqa": ("tissue", "pathology"),
    "textvqa": ("signs", "read_text"),
    "timeclock": ("clocks", "time"),
    "colour": ("shapes", "colour"),
    "shape": ("shapes", "shape"),
    "position": ("shapes", "position"),
    "size": ("shapes", "size"),
    "presence": ("shapes", "presence"),
    "caption_match": ("shapes", "caption_choice"),
    "background": ("shapes", "background"),
    "scene": ("mixed", "scene_kind"),
    "pixmocount_tissue": ("tissue", "count"),      # transfer: image-OOD/text-ID for pixmocount
    "textvqa_shapes": ("shapes", "read_text"),     # transfer: image-OOD/text-ID for textvqa
}


def run_domains(dr: DataRoot, eval_cfg: dict, names: list[str]) -> dict[str, dict[str, str]]:
    """{name: {"image", "text"}} for every name (tasks and benchmarks of a run) whose tags are known."""
    out: dict[str, dict[str, str]] = {}
    world_tasks = (dr.world or {}).get("tasks", {})
    for name in names:
        entry = world_tasks.get(name) or {}
        if name in (eval_cfg.get("domains") or {}):
            out[name] = dict(eval_cfg["domains"][name])
        elif entry.get("image_domain") and entry.get("text_domain"):
            out[name] = {"image": entry["image_domain"], "text": entry["text_domain"]}
        elif dr.world is not None and name in WORLD_DOMAINS:
            image, text = WORLD_DOMAINS[name]
            out[name] = {"image": image, "text": text}
    return out
