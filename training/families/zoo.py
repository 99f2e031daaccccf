"""Tiny random models of many families, built offline from transformers' own config classes, with a
processor and a chat template that work offline (the processor's image-token count equals what the tiny
vision tower produces). Their parts are discovered (discover.py): nothing here says where a part lives.

    model, processor = build("qwen3_vl")          # ~0.1 s; text-only models return their tokenizer
    family("qwen3_vl")                             # a Family (discovered paths) whose build_tiny is build

Each entry shrinks the config class's defaults (hidden 64, 2 layers, a 1-block vision tower at 32x32
pixels) and sets the token ids of a small BPE tokenizer with the family's image tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..tokenizer import build_tokenizer
from .base import TINY_CORPUS, Family
from .discover import discover

IMAGE = 32   # pixels per side of the tiny models' images
PATCH = 8
HIDDEN = 64
COMMON_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chat_template(image: str) -> str:
    """ChatML; an image part is written as `image` (the processor expands it to the model's image tokens)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class Tiny:
    model: str                                   # transformers model class
    config: str                                  # transformers config class
    tokens: tuple[str, ...] = ()                 # the family's special tokens (image tokens, ...)
    placeholder: str = ""                        # what the template writes for an image; "" = text-only
    text: dict = field(default_factory=dict)     # text-config keys (over the shrunk defaults)
    vision: dict = field(default_factory=dict)   # vision-config keys
    top: Callable[[Callable], dict] = lambda ids: {}   # top-level keys, given token -> id
    processor: Callable | None = None            # (tokenizer) -> processor
    tune: Callable | None = None                 # (model) -> None: adjust weights after init
    extra_special: dict = field(default_factory=dict)   # tokenizer attributes (boi_token, image_token, ...)
    notes: str = ""


def _shrink_text(d: dict, vocab: int, ids, layers: int) -> dict:
    d = dict(d)
    d.pop("layer_types", None)  # recomputed from num_hidden_layers
    small = dict(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=vocab, max_position_embeddings=1024,
                 moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                 linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                 sliding_window=64, pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"),
                 eos_token_id=ids("<|im_end|>"))
    d.update({k: v for k, v in small.items() if k in d or k.endswith("_token_id")})
    return d


def _shrink_vision(d: dict) -> dict:
    d = dict(d)
    small = dict(hidden_size=32, embed_dim=32, intermediate_size=64, num_hidden_layers=1, depth=1,
                 num_attention_heads=2, num_heads=2, attention_heads=2, image_size=IMAGE, patch_size=PATCH,
                 out_hidden_size=HIDDEN, projection_dim=32, head_dim=16, num_global_layers=1, vision_output_dim=64,
                 intermediate_layers_indices=[0], deepstack_visual_indexes=[0], max_num_tiles=1)
    d.update({k: v for k, v in small.items() if k in d})
    return d


def _mrope(d: dict) -> None:
    """mrope families split the rotary half-dimension over (time, height, width): match the shrunk head."""
    rope = dict(d.get("rope_parameters") or {})
    rot = int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]) * rope.get("partial_rotary_factor", 1)
    half = int(rot) // 2
    rope["mrope_section"] = [half // 2, half // 4, half - half // 2 - half // 4]
    d["rope_parameters"] = rope


def tokenizer_for(spec: Tiny):
    return build_tokenizer(TINY_CORPUS, vocab_size=400, style="bytelevel",
                           special_tokens=COMMON_TOKENS + list(spec.tokens), eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", bos_token="<|endoftext|>", chat_template=chat_template(spec.placeholder),
                           named_tokens=spec.extra_special or None)


def available(name: str) -> bool:
    """Whether this transformers has the entry's classes (older releases lack the newest families)."""
    import transformers
    spec = TINY[name]
    return hasattr(transformers, spec.model) and hasattr(transformers, spec.config)


def build(name: str, seed: int = 0, layers: int = 2):
    """(tiny random model in eval mode, processor) of zoo entry `name`."""
    import transformers

    spec = TINY[name]
    tok = tokenizer_for(spec)
    ids = tok.convert_tokens_to_ids
    config_cls = getattr(transformers, spec.config)
    d = config_cls().to_dict()
    text_key = "text_config" if "text_config" in d else None
    text = _shrink_text(d[text_key] if text_key else d, len(tok), ids, layers)
    text.update(spec.text)
    if "mrope" in spec.notes:
        _mrope(text)
    if text_key:
        d[text_key] = text
        if d.get("vision_config"):
            d["vision_config"] = {**_shrink_vision(d["vision_config"]), **spec.vision}
        d.update(spec.top(ids))
        d.update({k: v for k, v in (("pad_token_id", ids("<|endoftext|>")), ("vocab_size", len(tok))) if k in d})
    else:
        d = text
    d.pop("layer_types", None)
    torch.manual_seed(seed)
    model = getattr(transformers, spec.model)(config_cls.from_dict(d))
    if spec.tune is not None:
        spec.tune(model)
    processor = spec.processor(tok) if spec.processor else tok
    return model.eval(), processor


class ZooFamily(Family):
    def build_tiny(self, seed: int = 0, **overrides):
        return build(self.name, seed=seed, **overrides)


_FAMILIES: dict[str, Family] = {}


def family(name: str) -> Family:
    """The zoo entry's Family: part paths discovered from its tiny model."""
    if name not in _FAMILIES:
        model = build(name)[0]
        _FAMILIES[name] = ZooFamily.from_discovered(discover(model), type(model).__name__, name)
    return _FAMILIES[name]


# -- processors ----------------------------------------------------------------------------------------
def _qwen_processor(processor_cls: str, merge: int = 2, temporal: int = 2) -> Callable:
    def make(tok):
        import transformers

        pixels = IMAGE * IMAGE
        kw = dict(patch_size=PATCH, merge_size=merge, temporal_patch_size=temporal)
        image = transformers.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, **kw)
        video = transformers.Qwen2VLVideoProcessor(min_pixels=pixels, max_pixels=pixels, **kw)
        if processor_cls == "Glm4vProcessor":
            image = transformers.Glm4vImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, **kw)
            video = transformers.Glm4vVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, **kw)
        return getattr(transformers, processor_cls)(image_processor=image, tokenizer=tok, video_processor=video,
                                                    chat_template=tok.chat_template)
    return make


def _llava_processor(tok):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return LlavaProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=tok.chat_template)


def _paligemma_processor(tok):
    from transformers import PaliGemmaProcessor, SiglipImageProcessor

    image = SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE})
    image.image_seq_length = (IMAGE // PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image, tokenizer=tok, chat_template=tok.chat_template)


def _mistral3_processor(tok):
    from transformers import PixtralImageProcessor, PixtralProcessor

    image = PixtralImageProcessor(size={"longest_edge": IMAGE}, patch_size=PATCH)
    return PixtralProcessor(image_processor=image, tokenizer=tok, patch_size=PATCH, spatial_merge_size=2,
                            image_token="[IMG]", image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]",
                            chat_template=tok.chat_template)


def _gemma3_processor(tok):
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    image = Gemma3ImageProcessor(size={"height": IMAGE, "width": IMAGE})
    return Gemma3Processor(image_processor=image, tokenizer=tok, image_seq_length=4,
                           chat_template=tok.chat_template)


def _internvl_processor(tok):
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    image = GotOcr2ImageProcessor(size={"height": IMAGE, "width": IMAGE}, crop_to_patches=False, max_patches=1)
    video = InternVLVideoProcessor(size={"height": IMAGE, "width": IMAGE})
    return InternVLProcessor(image_processor=image, tokenizer=tok, video_processor=video, image_seq_length=4,
                             chat_template=tok.chat_template)


def _idefics3_processor(tok):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    image = Idefics3ImageProcessor(size={"longest_edge": IMAGE}, max_image_size={"longest_edge": IMAGE},
                                   do_image_splitting=False)
    return Idefics3Processor(image_processor=image, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)


def _mllama_processor(tok):
    from transformers import MllamaImageProcessor, MllamaProcessor

    image = MllamaImageProcessor(size={"height": IMAGE, "width": IMAGE}, max_image_tiles=1)
    return MllamaProcessor(image_processor=image, tokenizer=tok, chat_template=tok.chat_template)


def _mllama_tune(model) -> None:
    """Cross-attention gates start at 0 (no gradient reaches the cross-attention at init), and constant
    norms / zero biases hide which tensors a step changed: make them small, non-zero and non-constant."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.dim() <= 1 and "cross_attn" in name:
                p.copy_(0.1 + 0.05 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1 and ("norm" in name or name.endswith("bias")):
                p.add_(0.01 * torch.randn(p.shape, generator=g))


QWEN_VL = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def _qwen_top(ids) -> dict:
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


TINY: dict[str, Tiny] = {
    "qwen2_vl": Tiny("Qwen2VLForConditionalGeneration", "Qwen2VLConfig", QWEN_TOKENS, QWEN_VL,
                     vision=dict(hidden_size=HIDDEN, embed_dim=32, mlp_ratio=2), top=_qwen_top,
                     processor=_qwen_processor("Qwen2VLProcessor"), notes="mrope"),
    "qwen3_vl": Tiny("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", QWEN_TOKENS, QWEN_VL,
                     vision=dict(num_position_embeddings=16), top=_qwen_top,
                     processor=_qwen_processor("Qwen3VLProcessor"), notes="mrope"),
    "qwen3_vl_moe": Tiny("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig", QWEN_TOKENS, QWEN_VL,
                         vision=dict(num_position_embeddings=16), top=_qwen_top,
                         processor=_qwen_processor("Qwen3VLProcessor"), notes="mrope"),
    "qwen3_5": Tiny("Qwen3_5ForConditionalGeneration", "Qwen3_5Config", QWEN_TOKENS, QWEN_VL,
                    text=dict(head_dim=32, num_hidden_layers=4), vision=dict(num_position_embeddings=16),
                    top=_qwen_top,
                    processor=_qwen_processor("Qwen3VLProcessor"), notes="mrope; 4 layers: 3 linear, 1 softmax"),
    "glm4v": Tiny("Glm4vForConditionalGeneration", "Glm4vConfig",
                  ("<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>",
                   "<|end_of_video|>"), "<|begin_of_image|><|image|><|end_of_image|>",
                  top=lambda ids: dict(image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
                                       image_start_token_id=ids("<|begin_of_image|>"),
                                       image_end_token_id=ids("<|end_of_image|>"),
                                       video_start_token_id=ids("<|begin_of_video|>"),
                                       video_end_token_id=ids("<|end_of_video|>")),
                  processor=_qwen_processor("Glm4vProcessor"), notes="mrope"),
    "internvl": Tiny("InternVLForConditionalGeneration", "InternVLConfig",
                     ("<img>", "</img>", "<IMG_CONTEXT>", "<video>"), "<IMG_CONTEXT>",
                     vision=dict(image_size=[IMAGE, IMAGE], patch_size=[PATCH, PATCH]),
                     top=lambda ids: dict(image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=4),
                     extra_special=dict(start_image_token="<img>", end_image_token="</img>",
                                        context_image_token="<IMG_CONTEXT>", video_token="<video>"),
                     processor=_internvl_processor),
    "idefics3": Tiny("Idefics3ForConditionalGeneration", "Idefics3Config",
                     ("<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"), "<image>",
                     top=lambda ids: dict(image_token_id=ids("<image>"), scale_factor=2),
                     extra_special=dict(image_token="<image>", fake_image_token="<fake_token_around_image>",
                                        global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>"),
                     processor=_idefics3_processor),
    "gemma3": Tiny("Gemma3ForConditionalGeneration", "Gemma3Config",
                   ("<start_of_image>", "<end_of_image>", "<image_soft_token>"), "<start_of_image>",
                   top=lambda ids: dict(boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                                        image_token_index=ids("<image_soft_token>"), mm_tokens_per_image=4),
                   vision=dict(vision_use_head=False),
                   extra_special=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>",
                                      image_token="<image_soft_token>"),
                   processor=_gemma3_processor),
    "mllama": Tiny("MllamaForConditionalGeneration", "MllamaConfig", ("<|image|>",), "<|image|>",
                   text=dict(cross_attention_layers=[1], num_hidden_layers=3),
                   vision=dict(supported_aspect_ratios=[[1, 1]]),
                   top=lambda ids: dict(image_token_index=ids("<|image|>")),
                   processor=_mllama_processor, tune=_mllama_tune,
                   notes="3 layers, layer 1 cross-attention; gates set non-zero (they start at 0)"),
    "mistral3": Tiny("Mistral3ForConditionalGeneration", "Mistral3Config", ("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
                     "[IMG]", top=lambda ids: dict(image_token_index=ids("[IMG]")),
                     processor=_mistral3_processor),
    "paligemma": Tiny("PaliGemmaForConditionalGeneration", "PaliGemmaConfig", ("<image>",), "<image>",
                      top=lambda ids: dict(image_token_index=ids("<image>"), hidden_size=HIDDEN, projection_dim=HIDDEN),
                      vision=dict(projection_dim=HIDDEN), extra_special=dict(image_token="<image>"),
                      processor=_paligemma_processor),
    "llava": Tiny("LlavaForConditionalGeneration", "LlavaConfig", ("<image>",), "<image>",
                  top=lambda ids: dict(image_token_index=ids("<image>"), image_seq_length=(IMAGE // PATCH) ** 2),
                  vision=dict(num_hidden_layers=2), processor=_llava_processor),
    "qwen3": Tiny("Qwen3ForCausalLM", "Qwen3Config"),
    "llama": Tiny("LlamaForCausalLM", "LlamaConfig"),
    "phi3": Tiny("Phi3ForCausalLM", "Phi3Config", notes="fused qkv_proj and gate_up_proj"),
}
