"""LLaVA-OneVision: SigLIP vision tower, a 2-layer MLP projector (+ the learned `image_newline`), Qwen2 decoder.

Pitfall this adapter exists for: SigLIP layers have `self_attn.q_proj` ... `out_proj` and `mlp.fc1/fc2`,
so a substring match on "q_proj" would also train the vision encoder.
"""
from __future__ import annotations

import torch

from ..tokenizer import build_tokenizer
from .base import TINY_CORPUS, Family

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The OneVision chat template: images first in the user turn, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(texts=TINY_CORPUS, vocab_size: int = 400):
    return build_tokenizer(texts, vocab_size=vocab_size, style="bytelevel", special_tokens=SPECIAL_TOKENS,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def make_processor(tokenizer, *, image_size: int = 32, patch_size: int = 8):
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    s = image_size
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": s, "width": s}, image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        do_pad=True)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": s, "width": s})
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor,
                                   num_image_tokens=(image_size // patch_size) ** 2,
                                   vision_feature_select_strategy="full", chat_template=tokenizer.chat_template,
                                   vision_aspect_ratio="anyres_max_9")


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2, image_size: int = 32,
                patch_size: int = 8):
    from transformers import LlavaOnevisionConfig

    ids = tokenizer.convert_tokens_to_ids
    s = image_size
    return LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=ids("<|endoftext|>")),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_hidden_layers=vision_depth,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           vision_use_head=False),
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )


class LlavaOnevisionFamily(Family):
    def build_tiny(self, seed: int = 0, tokenizer=None, image_size: int = 32, **overrides):
        from transformers import LlavaOnevisionForConditionalGeneration

        tokenizer = tokenizer or tiny_tokenizer()
        patch = overrides.get("patch_size", 8)
        processor = make_processor(tokenizer, image_size=image_size, patch_size=patch)
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(tiny_config(tokenizer, image_size=image_size, **overrides))
        return model.eval(), processor


FAMILY = LlavaOnevisionFamily(
    name="llava_onevision",
    model_types=("llava_onevision",),
    model_class_name="LlavaOnevisionForConditionalGeneration",
    vision="model.vision_tower",
    projector=("model.multi_modal_projector", "model.image_newline"),
    image_token="<image>",
    notes="projector = multi_modal_projector + image_newline (the learned row separator it inserts)",
)
