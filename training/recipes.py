"""Tuning recipes: which parameters train, stated exactly and scoped to the language model.

A recipe is a small spec over the parts discovery locates in any model (training/families/discover.py):

    all  vision  projector  lm  embed  lm_head  final_norm  other          (model-level parts)
    layer  attn  attn.q  attn.k  attn.v  attn.o  attn.qkv                  (per decoder layer)
    mlp  mlp.gate  mlp.up  mlp.down  experts  router  xattn  linear_attn  norm

`attn` is softmax self-attention only (never cross-attention or linear attention); `mlp` covers dense MLPs,
routed and shared experts but never routers; a fused tensor (qkv_proj, gate_up_proj) is selected whole
or not at all, and a spec that would take part of one is an error (docs/families.md has the table).

Terms are separated by spaces, commas or '+'; a leading '-' removes a term; a per-layer part may be
scoped with a Python slice: `layers[-4:].attn`, `layers[:2].mlp.gate`, `layers[3].layer`.
Terms apply left to right, so `mlp -mlp.down` is `mlp_gate_up`.

Named recipes (the study's): full, vision, projector, llm, sa_proj, sa_qkv, mlp, mlp_gate_up, mlp_down;
layer-range variants of the per-layer ones and of llm: `sa_proj_last4`, `mlp_gate_up_first2`, `llm_last8`
(`llm_lastN` = whole decoder layers only; embeddings, final norm and lm_head stay frozen).

    python -m training.recipes --family qwen2_5_vl --recipe sa_proj [--model PATH] [--json]
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from dataclasses import dataclass, field

from torch import nn

from .families import Family, family_of_model, get_family
from .families.discover import COMPONENTS

log = logging.getLogger(__name__)

RECIPES: dict[str, str] = {
    "full": "all",
    "vision": "vision",
    "projector": "projector",
    "llm": "lm",
    "sa_proj": "attn",
    "sa_qkv": "attn.qkv",
    "mlp": "mlp",
    "mlp_gate_up": "mlp.gate mlp.up",
    "mlp_down": "mlp.down",
}
# Recipes that may take a _lastN / _firstN suffix, and the per-layer spec that the suffix scopes.
LAYER_SCOPED = {"sa_proj": "attn", "sa_qkv": "attn.qkv", "mlp": "mlp", "mlp_gate_up": "mlp.gate mlp.up",
                "mlp_down": "mlp.down", "llm": "layer"}

MODEL_PARTS = ("all", "vision", "projector", "lm", "embed", "lm_head", "final_norm", "other")
_MLP_KINDS = ("mlp", "experts", "shared")  # dense MLP, routed experts, shared experts
# Per-layer parts -> the components (training/families/discover.py) they cover; None = the whole layer.
LAYER_PARTS: dict[str, frozenset[str] | None] = {
    "layer": None,
    "attn": frozenset({"attn.q", "attn.k", "attn.v", "attn.o"}),
    "attn.qkv": frozenset({"attn.q", "attn.k", "attn.v"}),
    **{f"attn.{k}": frozenset({f"attn.{k}"}) for k in "qkvo"},
    "mlp": frozenset(f"{kind}.{p}" for kind in _MLP_KINDS for p in ("gate", "up", "down", "other")),
    **{f"mlp.{p}": frozenset(f"{kind}.{p}" for kind in _MLP_KINDS) for p in ("gate", "up", "down")},
    "experts": frozenset(f"experts.{p}" for p in ("gate", "up", "down", "other")),
    "router": frozenset({"router"}),
    "xattn": frozenset({"xattn"}),
    "linear_attn": frozenset({"linear_attn"}),
    "norm": frozenset({"norm", "attn.norm"}),
}
_TERM = re.compile(r"^(?P<neg>-)?(?:layers\[(?P<slice>[^\]]*)\]\.)?(?P<part>[a-z_.]+)$")


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class ParamInfo:
    name: str
    part: str               # vision, projector, embed, final_norm, lm_head, other, or a layer role (attn.q, ...)
    layer: int | None       # decoder layer index for layer-local parts
    numel: int
    shape: tuple[int, ...]

    @property
    def components(self) -> frozenset[str]:
        """What a layer tensor holds: one component, or several for a fused tensor (attn.qkv, mlp.gate_up)."""
        return COMPONENTS.get(self.part, frozenset({self.part}))


def catalogue(model: nn.Module, family: Family | None = None) -> list[ParamInfo]:
    """Every parameter name (tied duplicates included) with the part it belongs to."""
    family = family or family_of_model(model)
    under = lambda name, path: path is not None and (name == path or name.startswith(path + "."))  # noqa: E731
    layer_re = re.compile(re.escape(family.layers) + r"\.(\d+)\.(.+)$")
    roles = [family.layer_roles(layer) for layer in model.get_submodule(family.layers)]
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        layer = None
        if any(under(name, path) for path in family.projector):
            part = "projector"
        elif under(name, family.vision):
            part = "vision"
        elif m := layer_re.match(name):
            layer = int(m.group(1))
            part = roles[layer].get(m.group(2), "layer.other")
        elif under(name, family.embed):
            part = "embed"
        elif under(name, family.final_norm):
            part = "final_norm"
        elif under(name, family.lm_head):
            part = "lm_head"
        else:
            part = "other"
        out.append(ParamInfo(name, part, layer, p.numel(), tuple(p.shape)))
    return out


def resolve_spec(recipe: str) -> str:
    """Named recipe (with optional _lastN/_firstN) -> spec; anything else is taken as a spec."""
    if recipe in RECIPES:
        return RECIPES[recipe]
    m = re.fullmatch(r"(?P<base>[a-z_]+?)_(?P<side>last|first)(?P<n>\d+)", recipe)
    if m and m.group("base") in LAYER_SCOPED:
        n = int(m.group("n"))
        if n < 1:
            raise RecipeError(f"recipe {recipe!r}: the layer count must be at least 1")
        sl = f"-{n}:" if m.group("side") == "last" else f":{n}"
        return " ".join(f"layers[{sl}].{t}" for t in LAYER_SCOPED[m.group("base")].split())
    if m and m.group("base") in RECIPES:
        raise RecipeError(f"recipe {recipe!r}: {m.group('base')!r} has no layer-range variant; "
                          f"variants exist for {', '.join(LAYER_SCOPED)}")
    if _looks_like_spec(recipe):
        return recipe
    raise RecipeError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)} "
                      f"(and {', '.join(n + '_lastN' for n in LAYER_SCOPED)} / _firstN), or a spec such as "
                      f"'layers[-4:].attn mlp.gate'; parts: {', '.join(MODEL_PARTS + tuple(LAYER_PARTS))}")


def _looks_like_spec(text: str) -> bool:
    terms = _split_terms(text)
    return bool(terms) and all(_TERM.match(t) and _TERM.match(t).group("part") in (*MODEL_PARTS, *LAYER_PARTS)
                               for t in terms)


def _split_terms(spec: str) -> list[str]:
    return [t for t in re.split(r"[\s,+]+(?![^\[]*\])", spec.strip()) if t]


def _layer_indices(text: str | None, n_layers: int, term: str) -> set[int]:
    if text is None:
        return set(range(n_layers))
    try:
        bounds = [int(x) if x.strip() else None for x in text.split(":")]
    except ValueError:
        raise RecipeError(f"term {term!r}: layer selector [{text}] is not an integer or a slice") from None
    if len(bounds) == 1:
        i = bounds[0]
        if i is None or not -n_layers <= i < n_layers:
            raise RecipeError(f"term {term!r}: layer {text} out of range for {n_layers} decoder layers")
        return {i % n_layers}
    if len(bounds) > 3:
        raise RecipeError(f"term {term!r}: layer selector [{text}] is not an integer or a slice")
    idx = range(n_layers)[slice(*bounds)]
    return set(idx)


def select(catalog: list[ParamInfo], spec: str, n_layers: int) -> list[str]:
    """Names selected by `spec`, in model order. Raises RecipeError on bad terms, an empty selection, or a
    selection of part of a fused tensor (e.g. `attn.q` on a fused qkv_proj)."""
    picked: dict[str, frozenset[str]] = {}  # name -> the components selected so far
    terms = _split_terms(spec)
    if not terms:
        raise RecipeError("empty recipe spec")
    for term in terms:
        m = _TERM.match(term)
        if not m:
            raise RecipeError(f"cannot parse recipe term {term!r}; expected e.g. 'attn', '-mlp.down', "
                              "'layers[-4:].mlp.gate'")
        part, sl = m.group("part"), m.group("slice")
        if part in MODEL_PARTS:
            if sl is not None:
                raise RecipeError(f"term {term!r}: {part!r} is not a per-layer part, it cannot take layers[...]")
            hit = {p.name: p.components for p in catalog if p.name in _model_part(catalog, part)}
        elif part in LAYER_PARTS:
            layers = _layer_indices(sl, n_layers, term)
            covered = LAYER_PARTS[part]
            hit = {p.name: p.components if covered is None else p.components & covered
                   for p in catalog if p.layer in layers}
        else:
            raise RecipeError(f"term {term!r}: unknown part {part!r}; parts: "
                              f"{', '.join(MODEL_PARTS + tuple(LAYER_PARTS))}")
        for name, comps in hit.items():
            picked[name] = picked.get(name, frozenset()) - comps if m.group("neg") else \
                picked.get(name, frozenset()) | comps
    partial = [p for p in catalog if picked.get(p.name) and picked[p.name] != p.components]
    if partial:
        p = partial[0]
        raise RecipeError(f"recipe spec {spec!r} selects {', '.join(sorted(picked[p.name]))} of {p.name}, a fused "
                          f"tensor that holds {', '.join(sorted(p.components))}; training part of a fused tensor "
                          f"is not supported: select all of it (e.g. {_whole_term(p.part)}) or none")
    chosen = [p.name for p in catalog if picked.get(p.name)]
    if not chosen:
        present = sorted({p.part for p in catalog if p.layer is not None})
        raise RecipeError(f"recipe spec {spec!r} selects no parameter of this model (its decoder layers hold: "
                          f"{', '.join(present)})")
    return chosen


def _whole_term(role: str) -> str:
    return {"attn.qkv": "'attn.qkv' (sa_qkv) or 'attn' (sa_proj)", "attn.kv": "'attn.k attn.v'"}.get(
        role, "'mlp.gate mlp.up' (mlp_gate_up) or 'mlp'")


def _model_part(catalog: list[ParamInfo], part: str) -> set[str]:
    if part == "all":
        return {p.name for p in catalog}
    if part == "lm":
        return {p.name for p in catalog if p.layer is not None or p.part in ("embed", "final_norm", "lm_head")}
    return {p.name for p in catalog if p.part == part}


@dataclass
class AppliedRecipe:
    recipe: str
    spec: str
    trainable: list[str]                       # parameter names, model order
    trainable_params: int
    total_params: int
    groups: list[dict] = field(default_factory=list)  # [{"name": "vision"|"default", "params": [...], "names": [...]}]

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"recipe {self.recipe}: trainable {self.trainable_params:,} / total {self.total_params:,} "
                f"({pct:.2f}%) in {len(self.trainable)} tensors")


def plan(model: nn.Module, recipe: str, family: Family | None = None) -> AppliedRecipe:
    """What `recipe` would train, without touching requires_grad."""
    family = family or family_of_model(model)
    spec = resolve_spec(recipe)
    cat = catalogue(model, family)
    names = select(cat, spec, family.num_layers(model))
    params = dict(model.named_parameters(remove_duplicate=False))
    _check_ties(params, set(names), recipe)
    vision_names = {p.name for p in cat if p.part == "vision"}
    groups: dict[str, dict] = {}
    seen: set[int] = set()
    for n in names:
        if id(params[n]) in seen:
            continue
        seen.add(id(params[n]))
        g = groups.setdefault("vision" if n in vision_names else "default",
                              {"name": "vision" if n in vision_names else "default", "params": [], "names": []})
        g["params"].append(params[n])
        g["names"].append(n)
    unique = {id(p): p.numel() for p in params.values()}
    return AppliedRecipe(recipe=recipe, spec=spec, trainable=names,
                         trainable_params=sum(p.numel() for g in groups.values() for p in g["params"]),
                         total_params=sum(unique.values()), groups=list(groups.values()))


def _check_ties(params: dict, chosen: set[str], recipe: str) -> None:
    by_tensor: dict[int, list[str]] = {}
    for n, p in params.items():
        by_tensor.setdefault(id(p), []).append(n)
    for names in by_tensor.values():
        picked = [n for n in names if n in chosen]
        if picked and len(picked) != len(names):
            other = [n for n in names if n not in chosen]
            raise RecipeError(f"recipe {recipe!r} selects {picked[0]} but not {other[0]}, and the two are one tied "
                              "tensor (tie_word_embeddings): select both or neither")


def apply_recipe(model: nn.Module, recipe: str, family: Family | None = None) -> AppliedRecipe:
    """Freeze everything, unfreeze exactly the recipe's tensors, return the optimizer parameter groups."""
    applied = plan(model, recipe, family)
    for p in model.parameters():
        p.requires_grad_(False)
    for g in applied.groups:
        for p in g["params"]:
            p.requires_grad_(True)
    log.info(applied.summary())
    return applied


# -- command line ------------------------------------------------------------------------------------
def _model_for_listing(family_name: str | None, model_path: str | None):
    """The family's tiny random model, or a real checkpoint's architecture on the meta device (no weights read)."""
    if model_path is None:
        if family_name is None:
            raise RecipeError("give --family (for its tiny random model) or --model PATH")
        family = get_family(family_name)
        return family, family.build_tiny()[0]
    from .families import check_checkpoint_folder, family_of_checkpoint
    check_checkpoint_folder(model_path)
    family = family_of_checkpoint(model_path)
    if family_name is not None and get_family(family_name).name != family.name:
        raise RecipeError(f"{model_path}: its config says family {family.name!r}, not {family_name!r}")
    return family, model_skeleton(model_path)


def model_skeleton(model_path) -> nn.Module:
    """A checkpoint folder's architecture (from its config.json) on the meta device: names and shapes, no
    weights read."""
    from .families import skeleton
    return skeleton(model_path)


def list_families() -> str:
    """The model types tested on tiny models: overridden (a file in training/families/) or discovered."""
    from .families import FAMILIES, zoo
    rows = [(t, "override", f.name, f.notes) for f in FAMILIES.values() for t in f.model_types]
    rows += [(name, "discovered", spec.model, spec.notes) for name, spec in zoo.TINY.items()]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'model_type':<{w}}  {'parts':<10}  class / notes"]
    lines += [f"{t:<{w}}  {how:<10}  {what}{'  (' + notes + ')' if notes else ''}" for t, how, what, notes in rows]
    lines.append("Any other model type whose layout is the common one is discovered too (docs/families.md).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.recipes", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", help="a family or model type of --list-families (optional with --model)")
    ap.add_argument("--recipe", help="a named recipe or a spec, e.g. sa_proj, 'layers[-4:].attn'")
    ap.add_argument("--model", help="a local checkpoint folder; default: the family's tiny random model")
    ap.add_argument("--json", action="store_true", help="print one JSON object for machines")
    ap.add_argument("--list-families", action="store_true",
                    help="print the model types known to work (tested on tiny models), discovered or overridden")
    args = ap.parse_args(argv)
    if args.list_families:
        print(list_families())
        return 0
    if args.recipe is None:
        ap.error("--recipe is required (or --list-families)")
    try:
        family, model = _model_for_listing(args.family, args.model)
        applied = plan(model, args.recipe, family)
    except ValueError as e:  # RecipeError and CheckpointError are ValueErrors with a clear message
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"family": family.name, "recipe": args.recipe, "trainable": applied.trainable,
                          "trainable_params": applied.trainable_params, "total_params": applied.total_params}))
        return 0
    info = {p.name: p for p in catalogue(model, family)}
    width = max(len(n) for n in applied.trainable)
    pw = max(11, *(len(info[n].part) for n in applied.trainable))
    print(f"family {family.name}  recipe {args.recipe}  spec {applied.spec!r}")
    print(f"{'tensor':<{width}}  {'part':<{pw}}  {'shape':<16}  {'numel':>12}")
    for n in applied.trainable:
        p = info[n]
        print(f"{n:<{width}}  {p.part:<{pw}}  {'x'.join(map(str, p.shape)):<16}  {p.numel:>12,}")
    print(f"trainable {applied.trainable_params} / total {applied.total_params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
