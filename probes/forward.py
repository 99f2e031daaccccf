"""The multimodal forward to the last hidden states (no output projection), with cached image features, and
the one definition of the positions that predict caption tokens.

    fwd = Forward(model, family, vision_cache=VisionCache())
    rows, seg = fwd.caption_rows(samples, idx, batch, image_keys)      # teacher-forced, a `Batcher` batch
    rows, seg = fwd.caption_rows(..., hooks=taps.capture)            # forward hooks around the model's pass

Every caller that runs a model forward (the probes, generation's prefill, drift, the layers' taps) goes
through here, so all of them read image features from the vision cache when one is given.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from .vision_cache import VisionCache, vision_fingerprint

# Whether the vision-cache forward (input embeddings with precomputed image features) gives the model's own
# hidden states, per (model class, dtype, device type, attention): checked once per process on a real batch.
_EMBEDS_PATH_OK: dict[tuple, bool] = {}


def embeds_path_unsupported(model: nn.Module) -> str | None:
    """Why image features cannot be placed into the input embeddings for this model (None: they can). The
    cache scatters `get_image_features` outputs into the image-token positions; models that read images by
    cross-attention (Mllama) have no image tokens to fill. A model whose forward does more than the scatter
    (Qwen3-VL's deepstack, Gemma 3's bidirectional image attention) is caught by `_check_embeds_path`."""
    if getattr(model.config, "image_token_id", None) is None:
        return "no image-token id in its config"
    if not hasattr(model.base_model, "get_image_features"):
        return "images enter by cross-attention, not as input embeddings" \
            if any("CrossAttention" in type(m).__name__ for m in model.modules()) \
            else "its base model has no get_image_features"
    return None


def caption_positions(answer_mask: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is a caption (answer) token: position t predicts token t+1."""
    predicts = torch.zeros_like(answer_mask)
    predicts[:, :-1] = answer_mask[:, 1:]
    return predicts


class Forward:
    """The model without its output projection, run on one device batch; with a vision cache, the image
    features come from the cache (or the model's own `get_image_features`, then stored) and are placed into
    the input embeddings exactly as the model's forward does."""

    def __init__(self, model: nn.Module, family, *, vision_cache: VisionCache | None = None,
                 proc_key: str | None = None):
        self.model, self.base = model, model.base_model
        weight = model.get_output_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.vision_cache, self.proc_key = vision_cache, proc_key
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.vision_fp = None            # None: the model's own path
        if vision_cache is not None and family.vision is not None:
            why = embeds_path_unsupported(model)
            if why is None:
                self.vision_fp = vision_fingerprint(model, family)
            else:
                warnings.warn(f"{model.config.model_type}: the vision cache is off ({why}); image features "
                              "are computed by the model's own forward", stacklevel=3)

    def to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, dtype=self.dtype if v.is_floating_point() else None, non_blocking=True)
            out[k] = v
        return out

    def positions(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill position ids and each row's next position. Qwen2-VL-style models use 3-D (mrope)
        positions from their own `get_rope_index`; the others count real tokens, so left or right
        padding gives every row the positions it would have alone."""
        mask = batch["attention_mask"]
        if hasattr(self.base, "get_rope_index") and batch.get("image_grid_thw") is not None:
            pos, _ = self.base.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                              image_grid_thw=batch["image_grid_thw"], attention_mask=mask)
            nxt = pos.masked_fill(mask[None] == 0, -1).amax(dim=(0, 2)) + 1
            return pos, nxt
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return pos, mask.long().sum(-1)

    def _rope_positions(self, batch: dict) -> torch.Tensor | None:
        if hasattr(self.base, "get_rope_index") and batch.get("image_grid_thw") is not None:
            return self.positions(batch)[0]
        return None

    def _image_features(self, samples, idx, batch: dict, image_keys: list[str]) -> torch.Tensor:
        """The batch's image features, concatenated in image order, from the vision cache or computed with
        the model's own `get_image_features` (and stored). Entries are keyed by the batch's images in order:
        the features are then bitwise those the model's forward computes for this very batch (a vision
        batch of other images could differ in the last bit), so cached and uncached runs, and runs with
        any number of processes, give identical numbers; LM-only stages run the same plan, so they hit."""
        vc = self.vision_cache
        images = [samples[i] for i in idx if samples[i].image is not None]
        key = (self.vision_fp, self.proc_key, tuple((s.id, s.image_ref) for s in images)) \
            if all(s.image_ref for s in images) else None
        hit = vc.get(key) if key is not None else None
        if hit is not None:
            vc.hits += len(images)
            return hit.to(self.device, non_blocking=True)
        vc.misses += len(images)
        out = self.base.get_image_features(**{k: batch[k] for k in image_keys}, return_dict=True)
        feats = list(out.pooler_output if hasattr(out, "pooler_output") else out)
        if len(feats) != len(images):
            raise RuntimeError(f"get_image_features gave {len(feats)} feature tensors for {len(images)} images")
        feats = torch.cat(feats)
        if key is not None:
            vc.put(key, feats)
        return feats

    def _lm_inputs(self, samples, idx, batch: dict, image_keys: list[str]) -> dict:
        """Keyword arguments for `self.base`: the batch itself, or (vision cache) input embeddings with the
        image features scattered into the image-token positions exactly as the model's forward does."""
        if self.vision_fp is None or not image_keys:
            return batch
        ids = batch["input_ids"]
        emb = self.base.get_input_embeddings()(ids)
        feats = self._image_features(samples, idx, batch, image_keys).to(emb.device, emb.dtype)
        emb = emb.masked_scatter((ids == self.image_token_id)[..., None].expand_as(emb), feats)
        pos = batch.get("position_ids")
        pos = pos if pos is not None else self._rope_positions(batch)
        out = {"inputs_embeds": emb, "attention_mask": batch["attention_mask"]}
        if pos is not None:
            out["position_ids"] = pos
        return out

    def _check_embeds_path(self, batch: dict, lm: dict) -> bool:
        """Once per process and model class: the embeddings path gives the model's own hidden states."""
        key = (type(self.model).__name__, self.dtype, self.device.type,
               getattr(self.model.config, "_attn_implementation", None))
        if key not in _EMBEDS_PATH_OK:
            ref = self.base(**batch, use_cache=False).last_hidden_state
            got = self.base(**lm, use_cache=False).last_hidden_state
            tol = 1e-5 if self.dtype == torch.float32 else 2e-2
            ok = ref.shape == got.shape and bool((ref - got).abs().max() <= tol * ref.abs().max().clamp(min=1))
            _EMBEDS_PATH_OK[key] = ok
            if not ok:
                warnings.warn(f"{key[0]}: the vision cache is off (its forward does more with images than place "
                              "their features into the input embeddings, e.g. deepstack features or bidirectional "
                              "image attention, or this transformers version differs); features are computed by "
                              "the model's own forward", stacklevel=4)
        return _EMBEDS_PATH_OK[key]

    def __call__(self, samples, idx, batch: dict, image_keys: list[str], position_ids=None,
                 hooks: AbstractContextManager | None = None, **kw) -> torch.Tensor:
        """Last hidden states for one device batch of samples[idx]; `hooks` is entered around the model's
        pass (and only that one: not around the once-per-process check of the embeddings path)."""
        own = batch if position_ids is None else batch | {"position_ids": position_ids}
        lm = self._lm_inputs(samples, idx, own, image_keys)
        if lm is not own and not self._check_embeds_path(own, lm):
            self.vision_fp = None
            lm = own
        with hooks if hooks is not None else contextlib.nullcontext():
            return self.base(**lm, **kw).last_hidden_state

    def caption_rows(self, samples, idx, batch: dict, image_keys: list[str],
                     hooks: Callable[[torch.Tensor], AbstractContextManager] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states at the positions that predict caption tokens, in (sample, position) order;
        the batch row of each) for one teacher-forced CPU batch (masks included; it is not changed).
        `hooks(positions)`: a context manager for the model's pass (e.g. forward hooks keeping those rows)."""
        batch = dict(batch)
        predicts = caption_positions(batch.pop("answer_mask").to(self.device))
        batch.pop("eot_mask")
        hidden = self(samples, idx, self.to_device(batch), image_keys,
                      hooks=hooks(predicts) if hooks is not None else None, use_cache=False)
        return hidden[predicts], predicts.nonzero()[:, 0]
