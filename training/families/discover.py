"""Find a model's parts from its module tree, for any model loaded with AutoModelForImageTextToText or
AutoModelForCausalLM: no per-family code when the layout is the common one.

    found = discover(model)            # paths: decoder, layers, embed, final_norm, lm_head, vision, projector
    layer_roles(layer)                 # {"self_attn.q_proj.weight": "attn.q", "mlp.experts.down_proj": "experts.down", ...}

The language model is what `get_decoder()` returns; its layer list is the ModuleList whose length is the text
config's `num_hidden_layers` (never a name match over the whole model: vision blocks reuse the LM's names).
Inside a decoder layer every parameter gets one role; a fused tensor's role covers several components
(`attn.qkv` = q, k and v rows; `mlp.gate_up` = gate and up rows), which is how recipes tell whole from part.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class DiscoveryError(ValueError):
    """A model whose layout discovery cannot read; the message names the model type and what is missing."""


# Roles -> the components they hold (a fused tensor holds several).
COMPONENTS: dict[str, frozenset[str]] = {
    "attn.q": frozenset({"attn.q"}), "attn.k": frozenset({"attn.k"}), "attn.v": frozenset({"attn.v"}),
    "attn.o": frozenset({"attn.o"}), "attn.qkv": frozenset({"attn.q", "attn.k", "attn.v"}),
    "attn.kv": frozenset({"attn.k", "attn.v"}), "attn.norm": frozenset({"attn.norm"}),
    "attn.other": frozenset({"attn.other"}), "xattn": frozenset({"xattn"}),
    "linear_attn": frozenset({"linear_attn"}), "router": frozenset({"router"}), "norm": frozenset({"norm"}),
    "layer.other": frozenset({"layer.other"}),
    **{f"{kind}.{p}": frozenset({f"{kind}.{p}"}) for kind in ("mlp", "experts", "shared")
       for p in ("gate", "up", "down", "other")},
    **{f"{kind}.gate_up": frozenset({f"{kind}.gate", f"{kind}.up"}) for kind in ("mlp", "experts", "shared")},
}

# Names of a decoder layer's children, by what they do.
SELF_ATTN = {"self_attn", "self_attention", "attention", "attn"}
CROSS_ATTN = {"cross_attn", "encoder_attn", "cross_attention", "crossattention"}
SEQ_MIXERS = {"linear_attn", "linear_attention", "mamba", "mixer", "conv", "short_conv", "ssm", "temporal_block",
              "recurrent"}
MLPS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe"}
# Classes whose name says "not softmax attention", whatever the attribute is called.
SEQ_MIXER_CLASS_HINTS = ("DeltaNet", "Mamba", "ShortConv", "LinearAttention", "Recurrent", "SSM")

# Projection names inside softmax attention and inside an MLP or expert.
ATTN_NAMES = {
    "attn.q": {"q_proj", "query", "q", "wq", "q_a_proj", "q_b_proj"},
    "attn.k": {"k_proj", "key", "k", "wk"},
    "attn.v": {"v_proj", "value", "v", "wv"},
    "attn.o": {"o_proj", "out_proj", "dense", "o", "wo", "c_proj"},
    "attn.qkv": {"qkv_proj", "query_key_value", "Wqkv", "c_attn", "qkv", "W_pack", "wqkv"},
    "attn.kv": {"kv_proj", "kv_a_proj_with_mqa", "kv_b_proj"},
}
MLP_NAMES = {
    "gate": {"gate_proj", "w1", "wi_0"},
    "up": {"up_proj", "w3", "fc1", "c_fc", "dense_h_to_4h", "wi_1", "fc_in"},
    "down": {"down_proj", "w2", "fc2", "c_proj", "dense_4h_to_h", "wo", "fc_out"},
    "gate_up": {"gate_up_proj", "gate_up", "w13"},
}
EXPERTS = {"experts"}
SHARED = {"shared_expert", "shared_experts", "shared_mlp"}
ROUTERS = {"gate", "router", "shared_expert_gate", "e_score_correction_bias"}

VISION_HINTS = ("vision", "visual", "image_encoder", "vit", "img_encoder")
PROJECTOR_HINTS = ("projector", "connector", "merger", "newline", "adapter", "aligner", "resampler", "mlp1")
FINAL_NORMS = ("norm", "final_layernorm", "final_norm", "ln_f", "embedding_norm", "norm_f")


@dataclass(frozen=True)
class Discovered:
    model_type: str
    decoder: str                 # path of get_decoder()
    layers: str                  # the decoder-layer ModuleList
    embed: str
    final_norm: str | None
    lm_head: str
    tied: bool                   # lm_head shares its weight with the input embeddings
    vision: str | None
    projector: tuple[str, ...]


def _is_norm(name: str, module: nn.Module) -> bool:
    return "Norm" in type(module).__name__ or "norm" in name.lower()


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def discover(model: nn.Module) -> Discovered:
    mt = getattr(model.config, "model_type", type(model).__name__)
    paths = _module_paths(model)
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError) as e:
        raise DiscoveryError(f"model_type {mt!r}: get_decoder() fails ({e}); add an override file "
                             "(docs/families.md)") from e
    if decoder is None or id(decoder) not in paths:
        raise DiscoveryError(f"model_type {mt!r}: get_decoder() returns no submodule of the model; "
                             "add an override file (docs/families.md)")
    dec_path = paths[id(decoder)]
    layers = _decoder_layers(model, decoder, dec_path, mt)
    embed_mod, head_mod = model.get_input_embeddings(), model.get_output_embeddings()
    if embed_mod is None or id(embed_mod) not in paths or head_mod is None or id(head_mod) not in paths:
        raise DiscoveryError(f"model_type {mt!r}: no input or output embedding module found "
                             "(get_input_embeddings / get_output_embeddings)")
    vision, projector = _vision_and_projector(model, dec_path, {paths[id(embed_mod)], paths[id(head_mod)]})
    return Discovered(model_type=mt, decoder=dec_path, layers=layers, embed=paths[id(embed_mod)],
                      final_norm=_final_norm(decoder, dec_path), lm_head=paths[id(head_mod)],
                      tied=head_mod.weight is embed_mod.weight, vision=vision, projector=projector)


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _decoder_layers(model, decoder: nn.Module, dec_path: str, mt: str) -> str:
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    lists = [(name, m) for name, m in decoder.named_modules() if isinstance(m, nn.ModuleList)]
    hits = [name for name, m in lists if len(m) == n]
    if not hits:
        found = ", ".join(f"{name or '(decoder)'}[{len(m)}]" for name, m in lists) or "none"
        raise DiscoveryError(f"model_type {mt!r}: no layer list of num_hidden_layers={n} under get_decoder() "
                             f"({dec_path}); module lists found: {found}. Add an override file (docs/families.md)")
    best = min(hits, key=lambda name: (name.count("."), name != "layers"))  # the shallowest, `layers` first
    return _join(dec_path, best)


def _final_norm(decoder: nn.Module, dec_path: str) -> str | None:
    norms = [(n, m) for n, m in decoder.named_children() if _is_norm(n, m) and any(True for _ in m.parameters())]
    for name in FINAL_NORMS:
        if any(n == name for n, _ in norms):
            return _join(dec_path, name)
    return _join(dec_path, norms[0][0]) if len(norms) == 1 else None


def _vision_and_projector(model: nn.Module, dec_path: str, lm_ends: set[str]) -> tuple[str | None, tuple[str, ...]]:
    """The vision tower and projector(s) are siblings of the decoder or of one of its ancestors, told apart
    by name; a projector nested in the tower (Qwen's `visual.merger`) counts as projector."""
    vision, projector = [], []
    ancestors = [""] + [".".join(dec_path.split(".")[:i]) for i in range(1, dec_path.count(".") + 1)]
    for anc in ancestors:
        parent = model.get_submodule(anc) if anc else model
        names = [n for n, _ in parent.named_children()] + [n for n, _ in parent.named_parameters(recurse=False)]
        for name in names:
            path = _join(anc, name)
            if path in lm_ends or dec_path == path or dec_path.startswith(path + "."):
                continue
            low = name.lower()
            if any(h in low for h in PROJECTOR_HINTS):
                projector.append(path)
            elif any(h in low for h in VISION_HINTS):
                vision.append(path)
    if len(vision) > 1:  # e.g. Phi-4-MM has an audio encoder too; keep the first and say nothing more
        vision = vision[:1]
    if vision:
        tower = model.get_submodule(vision[0])
        projector += [_join(vision[0], n) for n, _ in tower.named_children()
                      if any(h in n.lower() for h in PROJECTOR_HINTS)]
    return (vision[0] if vision else None), tuple(projector)


# -- roles inside one decoder layer --------------------------------------------------------------------
def layer_roles(layer: nn.Module) -> dict[str, str]:
    """Every parameter of one decoder layer (names relative to the layer) -> its role (a key of COMPONENTS)."""
    roles: dict[str, str] = {}
    for name, _ in layer.named_parameters(recurse=False):
        roles[name] = "xattn" if "cross_attn" in name else "layer.other"
    for child_name, child in layer.named_children():
        kind = _child_kind(child_name, child)
        for name, _ in child.named_parameters():
            roles[f"{child_name}.{name}"] = _role(kind, child, name)
    return roles


BLOCKS = ("attn", "xattn", "linear_attn", "mlp")   # the blocks that write into the residual stream


def layer_blocks(layer: nn.Module) -> dict[str, str]:
    """{kind: child name} of one decoder layer's blocks, kinds in BLOCKS order (softmax self-attention, cross-
    attention, linear attention / sequence mixer, MLP or MoE); a layer holds a subset (Qwen3.5: linear_attn or
    attn; Mllama's cross-attention layers: xattn)."""
    kinds: dict[str, str] = {}
    for n, c in layer.named_children():
        kinds.setdefault(_child_kind(n, c), n)
    return {k: kinds[k] for k in BLOCKS if k in kinds}


def _child_kind(name: str, child: nn.Module) -> str:
    cls = type(child).__name__
    if _is_norm(name, child):  # first: a norm's class may carry the family name (MambaRMSNorm)
        return "norm"
    if name in CROSS_ATTN or "CrossAttention" in cls:
        return "xattn"
    if name in SEQ_MIXERS or any(h in cls for h in SEQ_MIXER_CLASS_HINTS):
        return "linear_attn"
    if name in SELF_ATTN:
        return "attn"
    if name in MLPS:
        return "mlp"
    return "layer.other"


def _role(kind: str, child: nn.Module, name: str) -> str:
    if kind == "attn":
        return _attn_role(child, name)
    if kind == "mlp":
        return _mlp_role(child, name)
    return kind


def _attn_role(attn: nn.Module, name: str) -> str:
    if "." not in name:
        return "attn.other"  # a bare Parameter of the attention module (e.g. sinks)
    module = name.rsplit(".", 1)[0]
    last = module.rsplit(".", 1)[-1]
    for role, names in ATTN_NAMES.items():
        if last in names:
            return role
    return "attn.norm" if _is_norm(last, attn.get_submodule(module)) else "attn.other"


def _mlp_role(mlp: nn.Module, name: str) -> str:
    head, _, rest = name.partition(".")
    has_experts = any(n in EXPERTS for n, _ in mlp.named_children())
    if head in EXPERTS:
        return "experts." + _proj(rest)
    if head in SHARED:
        return "shared." + _proj(rest)
    if has_experts and head in ROUTERS:
        return "router"
    return "mlp." + _proj(name)


def _proj(name: str) -> str:
    """gate / up / down / gate_up / other from a parameter path inside an MLP or expert block; 3-D expert
    tensors are bare Parameters (`gate_up_proj`, `down_proj_bias`), Linear ones end in `.weight`/`.bias`."""
    parts = name.split(".")
    last = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    last = last.removesuffix("_bias")
    for proj, names in MLP_NAMES.items():
        if last in names:
            return proj
    return "other"
