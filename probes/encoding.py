"""Encode many samples of one processor quickly, into exactly the tensors `training.chat.encode` gives.

`training.chat.encode` is the one definition of a sample's inputs; on small models it was most of the
probe's time (chat template, three tokeniser calls and the processor's argument handling per sample).
Here the parts that do not depend on the pixels are memoised:

- the chat-template prompt per instruction;
- the prompt's token ids (image placeholders expanded) per (prompt, processed-image metadata): the
  expansion depends only on the image outputs' shapes and integer fields (grid, image size, patches),
  never on pixel values. A key seen for the first time goes through the full `chat.encode`, whose image
  outputs are also compared bitwise with the image-only call; any difference switches this encoder
  back to the full processor call for every sample, so a processor that works differently stays exact;
- the answer tokenisation, batched over the samples of a batch (the same boundary check as `encode`).

Per sample only the image processor runs. tests/test_probe_encoding.py checks tensor equality with
`training.chat.encode` for all three families, with and without answers and images.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from training.chat import (
    EncodingError,
    Example,
    answer_affixes,
    continue_extra,
    encode,
    prompt_text,
    tokenizer_of,
)

TEXT_KEYS = ("input_ids", "attention_mask")


def _signature(image_inputs: dict) -> tuple:
    """Everything about processed image outputs that the text expansion may read: shapes, integer values."""
    parts = []
    for k in sorted(image_inputs):
        v = image_inputs[k]
        if torch.is_tensor(v):
            vals = None if v.is_floating_point() else tuple(v.flatten().tolist())
            parts.append((k, tuple(v.shape), str(v.dtype), vals))
        else:
            parts.append((k, repr(v)))
    return tuple(parts)


class Encoder:
    """`encode_many([(image, instruction, answer_or_None), ...])` -> [Example]; one per processor.

    Thread-safe for one producer at a time (the engine's prefetch thread); memo tables are small
    (one entry per instruction and image-size class).
    """

    def __init__(self, processor):
        self.processor = processor
        self.tok = tokenizer_of(processor)
        self.fast = True                 # False once the image-only call disagreed with the full call
        self._lock = threading.Lock()
        self._prompts: dict[tuple[str, bool], str] = {}
        self._prompt_ids: dict[str, list[int]] = {}
        self._text: dict[tuple, tuple[torch.Tensor, dict, frozenset]] = {}
        self._affixes = None
        self._image_kwargs = self._merged_image_kwargs()
        # Processors on ProcessorMixin's own __call__ expand each image placeholder into the string
        # `replace_image_token` returns and tokenise the result: that string, with the prompt, decides the ids.
        from transformers.processing_utils import ProcessorMixin

        self._by_replacement = (type(processor).__call__ is ProcessorMixin.__call__
                                and type(processor).replace_image_token is not ProcessorMixin.replace_image_token)
        self._batched = True             # until the image processor's batch layout is not patch rows + grids
        self.stats = {"full": 0, "fast": 0}

    def _merged_image_kwargs(self) -> dict | None:
        """The image-processor arguments the processor's own call would use (None: call the processor)."""
        try:
            merged = self.processor._merge_kwargs(tokenizer_init_kwargs=getattr(self.tok, "init_kwargs", {}),
                                                  return_tensors="pt")
            return dict(merged["images_kwargs"])
        except Exception:  # another transformers version: the public call below is equally exact
            return None

    def _images(self, image) -> dict:
        if self._image_kwargs is not None:
            out = self.processor.image_processor(images=[image], **self._image_kwargs)
        else:
            out = self.processor(images=[image], return_tensors="pt")
        return dict(out)

    def _images_many(self, images: list) -> list[dict]:
        """Image outputs per image. Processors whose batch layout is known process the whole list in one
        call, split back per image: concatenated patch rows with a (t, h, w) grid per image (Qwen2-VL), or
        anyres tiles zero-padded to the batch's largest count (LLaVA-NeXT / OneVision). Their preprocessing
        is per image, so each part is that image's own output; every part that opens a new memo entry is
        compared with the processor's full call, as any image-only output is."""
        real = [im for im in images if im is not None]
        parts = None
        if self._batched and self._image_kwargs is not None and len(real) > 1:
            out = dict(self.processor.image_processor(images=real, **self._image_kwargs))
            parts = _split_patch_rows(out, len(real)) or _split_padded_tiles(out, len(real), self.processor)
            self._batched = parts is not None
        it = iter(parts or [self._images(im) for im in real])
        return [next(it) if im is not None else {} for im in images]

    def _text_key(self, images: dict):
        """What the prompt's token ids depend on besides the prompt: the placeholder's replacement text,
        or (other processors) every shape and integer field of the image outputs."""
        if images and self._by_replacement:
            try:
                return ("replace", self.processor.replace_image_token(images, image_idx=0, **(self._image_kwargs or {})))
            except Exception:  # an unusual processor: fall back to the conservative key
                self._by_replacement = False
        return ("signature", _signature(images))

    def prompt(self, instruction: str, with_image: bool) -> str:
        key = (instruction, with_image)
        if key not in self._prompts:
            self._prompts[key] = prompt_text(self.processor, instruction, with_image=with_image)
        return self._prompts[key]

    def affixes(self) -> tuple[str, str]:
        if self._affixes is None:
            self._affixes = answer_affixes(self.processor)
        return self._affixes

    # -- the prompt part -----------------------------------------------------------------------------
    def _prompt_part(self, image, instruction: str, images: dict) -> Example:
        """The prompt-only Example (what `encode(processor, image, instruction)` returns); `images`: this
        image's processed outputs."""
        if not self.fast:
            self.stats["full"] += 1
            return encode(self.processor, image, instruction)
        prompt = self.prompt(instruction, image is not None)
        key = (prompt, self._text_key(images))
        hit = self._text.get(key)
        if hit is None:
            self.stats["full"] += 1
            ex = encode(self.processor, image, instruction)
            full_keys = frozenset(ex.image_inputs)
            same = full_keys <= set(images) and all(
                torch.is_tensor(images[k]) == torch.is_tensor(v)
                and (torch.equal(images[k], v) if torch.is_tensor(v) else images[k] == v)
                for k, v in ex.image_inputs.items())
            if not same:      # the image-only call is not what the processor does: stay on the full call
                self.fast = False
                return ex
            self._text[key] = (ex.input_ids, ex.token_type_ids, full_keys)
            return ex
        self.stats["fast"] += 1
        ids, extras, keys = hit
        return Example(ids, int(ids.shape[0]), 0, 0, {k: images[k] for k in keys}, dict(extras))

    # -- whole samples -------------------------------------------------------------------------------
    def encode_many(self, items: Sequence[tuple]) -> list[Example]:
        """items: (image or None, instruction, answer or None). Errors are EncodingError naming the answer."""
        with self._lock:
            processed = self._images_many([image for image, _, _ in items]) if self.fast else [{}] * len(items)
            prompts = [self._prompt_part(image, instr, ims) for (image, instr, _), ims in zip(items, processed)]
            with_answer = [i for i, (_, _, a) in enumerate(items) if a is not None]
            if not with_answer:
                return prompts
            pre, post = self.affixes()
            texts = []
            for i in with_answer:
                _, instr, answer = items[i]
                p = self.prompt(instr, items[i][0] is not None)
                texts += [p + pre + answer, p + pre + answer + post]
            ids = self.tok(texts, add_special_tokens=False)["input_ids"]
            out = list(prompts)
            for j, i in enumerate(with_answer):
                _, instr, answer = items[i]
                p = self.prompt(instr, items[i][0] is not None)
                if p not in self._prompt_ids:
                    self._prompt_ids[p] = self.tok(p, add_special_tokens=False)["input_ids"]
                out[i] = _with_answer(prompts[i], self._prompt_ids[p], ids[2 * j], ids[2 * j + 1], answer)
            return out


def _with_answer(ex: Example, p_ids: list[int], a_ids: list[int], f_ids: list[int], answer: str) -> Example:
    """The prompt Example extended by the answer and end-of-turn ids, exactly as `chat.encode` does."""
    if a_ids[:len(p_ids)] != p_ids or f_ids[:len(a_ids)] != a_ids:
        raise EncodingError(f"tokenising the answer {answer[:40]!r} changes the prompt's last tokens; "
                            "cannot separate prompt and answer tokens")
    ids = ex.input_ids
    answer_ids = torch.tensor(a_ids[len(p_ids):], dtype=ids.dtype)
    eot_ids = torch.tensor(f_ids[len(a_ids):], dtype=ids.dtype)
    tail = len(answer_ids) + len(eot_ids)
    extras = {k: torch.cat([v, continue_extra(v, tail)]) for k, v in ex.token_type_ids.items()}
    return Example(torch.cat([ids, answer_ids, eot_ids]), ex.prompt_len, len(answer_ids), len(eot_ids),
                   ex.image_inputs, extras)


def _split_patch_rows(out: dict, n: int) -> list[dict] | None:
    """Per-image parts of a batched image-processor output laid out as concatenated patch rows plus one
    (t, h, w) grid per image; None for any other layout."""
    pv, grid = out.get("pixel_values"), out.get("image_grid_thw")
    if set(out) != {"pixel_values", "image_grid_thw"} or not torch.is_tensor(pv) or not torch.is_tensor(grid) \
            or pv.dim() != 2 or tuple(grid.shape) != (n, 3) or int(grid.prod(-1).sum()) != pv.shape[0]:
        return None
    rows = grid.prod(-1).tolist()
    return [{"pixel_values": p.clone(), "image_grid_thw": grid[i:i + 1].clone()}
            for i, p in enumerate(torch.split(pv, rows))]


def _split_padded_tiles(out: dict, n: int, processor) -> list[dict] | None:
    """Per-image parts of a LLaVA-NeXT/OneVision batch: pixel_values (n, tiles, C, H, W) zero-padded on the
    tile axis. Each image's tile count is the base tile plus its anyres grid, as the model itself counts it
    (`image_size_to_num_patches`); the padding must be exactly zero. None for any other layout."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pv, sizes = out.get("pixel_values"), out.get("image_sizes")
    if not set(out) <= {"pixel_values", "image_sizes", "batch_num_images"} or not torch.is_tensor(pv) \
            or not torch.is_tensor(sizes) or pv.dim() != 5 or pv.shape[0] != n or tuple(sizes.shape) != (n, 2):
        return None
    ip = processor.image_processor
    crop, size = getattr(ip, "crop_size", None), getattr(ip, "size", None)
    tile = (crop and crop.get("height")) or (size and (size.get("height") or size.get("shortest_edge")))
    pinpoints = getattr(ip, "image_grid_pinpoints", None)
    if not tile or not pinpoints:
        return None
    parts = []
    for i in range(n):
        k = image_size_to_num_patches(sizes[i].tolist(), pinpoints, tile)
        if k > pv.shape[1] or bool(pv[i, k:].any()):
            return None
        part = {"pixel_values": pv[i:i + 1, :k].clone(), "image_sizes": sizes[i:i + 1].clone()}
        if "batch_num_images" in out:
            bni = out["batch_num_images"]
            if not torch.is_tensor(bni) or tuple(bni.shape) != (n,) or bool((bni != 1).any()):
                return None
            part["batch_num_images"] = bni[i:i + 1].clone()
        parts.append(part)
    return parts
