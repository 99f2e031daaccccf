"""LLaVA-NeXT: CLIP vision tower, a 2-layer MLP projector (+ `image_newline`), Llama-3 or Mistral decoder.

Pitfall this adapter exists for: CLIP layers have `self_attn.q_proj/k_proj/v_proj/out_proj`, so a substring
match on "q_proj" would also train the vision encoder. The tiny tokenizer uses SentencePiece-style "▁"
markers (as Mistral / Llama-2 do), so both marker styles are exercised across the families.
"""
from __future__ import annotations

import torch

from ..tokenizer import build_tokenizer
from .base import TINY_CORPUS, Family

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]

# Mistral-instruct style, as llava-v1.6-mistral writes it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    " [/INST]"
    "{% else %} {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}{% endif %}"
    "</s>{% endif %}{% endfor %}"
)


def tiny_tokenizer(texts=TINY_CORPUS, vocab_size: int = 400):
    return build_tokenizer(texts, vocab_size=vocab_size, style="metaspace", special_tokens=SPECIAL_TOKENS,
                           eos_token="</s>", pad_token="<pad>", bos_token="<s>", chat_template=CHAT_TEMPLATE)


def make_processor(tokenizer, *, image_size: int = 32, patch_size: int = 8):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    s = image_size
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": s}, crop_size={"height": s, "width": s},
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], do_pad=True)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tokenizer.chat_template)


def tiny_config(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2, image_size: int = 32,
                patch_size: int = 8, text_model_type: str = "mistral"):
    from transformers import LlavaNextConfig

    ids = tokenizer.convert_tokens_to_ids
    s = image_size
    return LlavaNextConfig(
        text_config=dict(model_type=text_model_type, vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<pad>")),
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden,
                           intermediate_size=2 * vision_hidden, num_hidden_layers=vision_depth + 1,
                           num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           projection_dim=vision_hidden),
        image_token_index=ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]], tie_word_embeddings=False,
    )


class LlavaNextFamily(Family):
    def build_tiny(self, seed: int = 0, tokenizer=None, image_size: int = 32, **overrides):
        from transformers import LlavaNextForConditionalGeneration

        tokenizer = tokenizer or tiny_tokenizer()
        patch = overrides.get("patch_size", 8)
        processor = make_processor(tokenizer, image_size=image_size, patch_size=patch)
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(tiny_config(tokenizer, image_size=image_size, **overrides))
        return model.eval(), processor


FAMILY = LlavaNextFamily(
    name="llava_next",
    model_types=("llava_next",),
    model_class_name="LlavaNextForConditionalGeneration",
    vision="model.vision_tower",
    projector=("model.multi_modal_projector", "model.image_newline"),
    image_token="<image>",
    notes="vision_feature_layer -2 (as the real checkpoints); projector = multi_modal_projector + image_newline",
)
