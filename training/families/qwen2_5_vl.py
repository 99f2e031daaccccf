"""Qwen2.5-VL: a windowed ViT (`model.visual.blocks`) whose `merger` is the projector, and a Qwen2 decoder.

Pitfall this adapter exists for: the vision blocks have their own `mlp.gate_proj` / `mlp.up_proj`, so
a substring match on "gate_proj" would also train the vision encoder.
"""
from __future__ import annotations

import torch

from ..tokenizer import build_tokenizer
from .base import TINY_CORPUS, Family

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# ChatML as Qwen2.5-VL writes it (without the default system turn, to keep sequences short).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(texts=TINY_CORPUS, vocab_size: int = 400):
    tok = build_tokenizer(texts, vocab_size=vocab_size, style="bytelevel", special_tokens=SPECIAL_TOKENS,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    return tok


def make_processor(tokenizer, *, patch_size: int = 8, merge_size: int = 2, image_size: int = 32):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            min_pixels=pixels, max_pixels=pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                            min_pixels=pixels, max_pixels=pixels)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=tokenizer.chat_template)


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2, patch_size: int = 8,
                merge_size: int = 2):
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    # mrope splits head_dim/2 rotary frequencies over (time, height, width).
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": section},
                         tie_word_embeddings=False, bos_token_id=ids("<|endoftext|>"),
                         eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=2, patch_size=patch_size, spatial_merge_size=merge_size,
                           temporal_patch_size=2, out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1],
                           window_size=patch_size * merge_size * 2, in_channels=3),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
    )


class Qwen25VLFamily(Family):
    def build_tiny(self, seed: int = 0, tokenizer=None, image_size: int = 32, **overrides):
        from transformers import Qwen2_5_VLForConditionalGeneration

        tokenizer = tokenizer or tiny_tokenizer()
        processor = make_processor(tokenizer, patch_size=overrides.get("patch_size", 8),
                                   merge_size=overrides.get("merge_size", 2), image_size=image_size)
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, **overrides))
        return model.eval(), processor


FAMILY = Qwen25VLFamily(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class_name="Qwen2_5_VLForConditionalGeneration",
    vision="model.visual",
    projector=("model.visual.merger",),
    image_token="<|image_pad|>",
    notes="vision = model.visual minus its merger; projector = model.visual.merger",
)
