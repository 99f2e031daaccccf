"""One way to turn (image, instruction, answer) into model inputs, shared by training, probes and evaluation.

The checkpoint's own chat template renders the conversation (user turn = image + instruction, assistant
turn = answer). The processor expands the image placeholder and preprocesses the image once, for the
prompt; the answer and end-of-turn tokens are appended as ids, after checking that tokenising the whole
conversation gives exactly the prompt's tokens followed by them (so no BPE merge crosses the boundary).

    ex = encode(processor, image, "Describe the image.", "A red square.")
    ex.input_ids[ex.answer_slice]      # the answer's tokens (what a probe scores, what training learns)
    ex.input_ids[ex.eot_slice]         # end-of-turn tokens after the answer (training learns to stop)
    batch = collate([ex, ...], family, pad_id, padding_side="left")
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ANSWER_MARK = "\u2063ANSWER\u2063"  # an invisible separator no template or caption contains


class EncodingError(ValueError):
    pass


def tokenizer_of(processor):
    """The tokenizer of a multimodal processor; a text-only LM's processor is its tokenizer."""
    return getattr(processor, "tokenizer", processor)


def messages(instruction: str, answer: str | None = None, with_image: bool = True) -> list[dict]:
    user = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": instruction}]
    msgs = [{"role": "user", "content": user}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def prompt_text(processor, instruction: str, with_image: bool = True) -> str:
    return processor.apply_chat_template(messages(instruction, with_image=with_image),
                                         add_generation_prompt=True, tokenize=False)


def answer_affixes(processor) -> tuple[str, str]:
    """(text between the generation prompt and the answer, text after the answer) for this template."""
    prompt = prompt_text(processor, "x")
    full = processor.apply_chat_template(messages("x", ANSWER_MARK), tokenize=False)
    head, _, tail = full.partition(ANSWER_MARK)
    if not head.startswith(prompt):
        raise EncodingError("the chat template's assistant turn does not start with its generation prompt; "
                            "cannot locate answer tokens")
    return head[len(prompt):], tail


@dataclass
class Example:
    input_ids: torch.Tensor              # 1-D, image placeholders expanded
    prompt_len: int                      # tokens before the answer
    answer_len: int                      # answer tokens
    eot_len: int                         # end-of-turn tokens after the answer
    image_inputs: dict = field(default_factory=dict)  # processor outputs other than the text-aligned ones
    token_type_ids: dict = field(default_factory=dict)  # text-aligned extras (e.g. mm_token_type_ids), 1-D

    @property
    def answer_slice(self) -> slice:
        return slice(self.prompt_len, self.prompt_len + self.answer_len)

    @property
    def eot_slice(self) -> slice:
        e = self.prompt_len + self.answer_len
        return slice(e, e + self.eot_len)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def encode(processor, image, instruction: str, answer: str | None = None, *, affixes=None) -> Example:
    """Encode one example. With `answer=None`, only the prompt (for generation). A text-only model's
    processor is its tokenizer."""
    tok = tokenizer_of(processor)
    prompt = prompt_text(processor, instruction, with_image=image is not None)
    kwargs = {"images": [image]} if image is not None else {}
    enc = processor(text=[prompt], return_tensors="pt", **kwargs)
    ids = enc["input_ids"][0]
    n_text = ids.shape[0]
    text_keys = ("input_ids", "attention_mask", "labels")  # PaliGemma's processor also returns labels
    extras = {k: v[0] for k, v in enc.items()
              if k not in text_keys and torch.is_tensor(v) and v.shape[:2] == (1, n_text)}
    image_inputs = {k: v for k, v in enc.items() if k not in extras and k not in text_keys}
    if answer is None:
        return Example(ids, n_text, 0, 0, image_inputs, extras)

    pre, post = affixes or answer_affixes(processor)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(prompt + pre + answer, add_special_tokens=False)["input_ids"]
    f_ids = tok(prompt + pre + answer + post, add_special_tokens=False)["input_ids"]
    if a_ids[:len(p_ids)] != p_ids or f_ids[:len(a_ids)] != a_ids:
        raise EncodingError(f"tokenising the answer {answer[:40]!r} changes the prompt's last tokens; "
                            "cannot separate prompt and answer tokens")
    answer_ids = torch.tensor(a_ids[len(p_ids):], dtype=ids.dtype)
    eot_ids = torch.tensor(f_ids[len(a_ids):], dtype=ids.dtype)
    full = torch.cat([ids, answer_ids, eot_ids])
    tail = len(answer_ids) + len(eot_ids)
    extras = {k: torch.cat([v, continue_extra(v, tail)]) for k, v in extras.items()}
    return Example(full, n_text, len(answer_ids), len(eot_ids), image_inputs, extras)


def continue_extra(v: torch.Tensor, n: int) -> torch.Tensor:
    """A token-aligned extra for `n` appended text tokens: zeros (a token type), or for a per-token mask
    with more axes (Mllama's cross_attention_mask) the last prompt token's row, so answers see the image."""
    return v.new_zeros(n) if v.dim() == 1 else v[-1:].expand(n, *v.shape[1:])


def collate(examples: list[Example], family, pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of examples into one batch; also returns `answer_mask` and `eot_mask` (bool, B x T)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    T = max(len(e) for e in examples)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        n = T - t.shape[0]  # pad the first (token) axis
        return F.pad(t, (0, 0) * (t.dim() - 1) + ((n, 0) if padding_side == "left" else (0, n)), value=value)

    def span_mask(e: Example, sl: slice) -> torch.Tensor:
        m = torch.zeros(len(e), dtype=torch.bool)
        m[sl] = True
        return pad(m, False)

    batch = {
        "input_ids": torch.stack([pad(e.input_ids, pad_id) for e in examples]),
        "attention_mask": torch.stack([pad(torch.ones(len(e), dtype=torch.long), 0) for e in examples]),
        "answer_mask": torch.stack([span_mask(e, e.answer_slice) for e in examples]),
        "eot_mask": torch.stack([span_mask(e, e.eot_slice) for e in examples]),
    }
    for k in examples[0].token_type_ids:
        batch[k] = torch.stack([pad(e.token_type_ids[k], 0) for e in examples])
    with_images = [e.image_inputs for e in examples if e.image_inputs]
    if with_images:  # images pair with placeholder tokens in order, so text-only examples simply add none
        batch.update(family.collate_images(with_images))
    return batch
