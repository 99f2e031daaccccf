"""Greedy decoding (the study's generation mode): a KV cache from the prompt (image + instruction), up to
`max_new_tokens`, the greedy token from the chunked vocabulary reduction (no full logits), optionally the
probe statistics at every step including the one that emits the stop token; each sequence stops on its
own (finished rows leave the batch).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from training.chat import answer_affixes, tokenizer_of

from .captions import Sample
from .stats import SampleAccumulator

MAX_NEW_TOKENS = 256               # the study's generation length


@dataclass
class Generation:
    index: int                         # position of the sample in the list given to `generate`
    token_ids: list[int]               # generated ids, the stop token included when one was emitted
    text: str                          # decoded, special tokens removed
    stopped: bool                      # emitted a stop token (else it ran to max_new_tokens)
    stats: dict[str, float] = field(default_factory=dict)  # per-sample probe values (when stats=True)
    n_steps: int = 0


def stop_token_ids(model: nn.Module, processor) -> set[int]:
    """Tokens that end a generated answer: the generation config's and tokenizer's EOS, and the first token
    of the chat template's end of turn when it is a special token (e.g. <|im_end|>)."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    tok = tokenizer_of(processor)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    try:
        tail = answer_affixes(processor)[1]
        first = tok(tail, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in set(tok.all_special_ids):
            ids.add(first[0])
    except Exception:  # a template without an assistant turn: EOS alone
        pass
    if not ids:
        raise ValueError("no stop token: neither the generation config nor the tokenizer names an EOS token")
    return ids


def _decode_batch(eng, samples, idx, batch: dict, image_keys, max_new_tokens: int, stats: bool,
                  padding_side: str) -> tuple[torch.Tensor, list[dict]]:
    """(generated ids per row, -1 after the end; per-row probe values) for one batch."""
    from transformers import DynamicCache

    fwd, device = eng.forward, eng.device
    batch = fwd.to_device({k: v for k, v in batch.items() if k not in ("answer_mask", "eot_mask")})
    pos, nxt = fwd.positions(batch)
    mask = batch["attention_mask"]
    B, T = mask.shape
    cache = DynamicCache(config=eng.model.config.get_text_config())
    hidden = fwd(samples, idx, batch, image_keys, position_ids=pos, past_key_values=cache, use_cache=True)
    last = torch.full((B,), T - 1, device=device) if padding_side == "left" else mask.long().sum(-1) - 1
    h = hidden[torch.arange(B, device=device), last]
    # per-token masks with more axes (Mllama's cross_attention_mask): each new token sees what the prompt's
    # last token saw, as `chat.continue_extra` extends them for answers
    step_masks = {k: v[torch.arange(B, device=device), last][:, None] for k, v in batch.items()
                  if k.endswith("_mask") and k != "attention_mask" and torch.is_tensor(v) and v.dim() > 2
                  and v.shape[:2] == (B, T)}
    rows = torch.arange(B, device=device)   # active batch rows (finished rows leave)
    out_ids = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    acc = SampleAccumulator(eng.probe_names, B, device) if stats else None
    bad = torch.zeros(B, dtype=torch.bool, device=device)   # rows that met NaN/inf logits
    stop = torch.tensor(sorted(eng.stop_ids), device=device)
    for step in range(max_new_tokens):
        vs = eng.stats(h, want_argmax=True)
        bad[rows] |= ~(vs.lse.isfinite() & vs.entropy.isfinite())
        tok = vs.argmax
        out_ids[rows, step] = tok
        if stats:
            acc.add(rows, vs.probes())
        ended = torch.isin(tok, stop)
        if step == max_new_tokens - 1:
            break
        if bool(ended.any()):                  # one host sync per step, as any decoder needs
            keep = (~ended).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)
            mask, nxt, tok, rows = mask[keep], nxt[keep], tok[keep], rows[keep]
            step_masks = {k: v[keep] for k, v in step_masks.items()}
        mask = torch.cat([mask, mask.new_ones(rows.numel(), 1)], dim=1)
        step_pos = (nxt + step)[:, None]
        if pos.dim() == 3:
            step_pos = step_pos[None].expand(3, -1, -1)
        h = fwd.base(input_ids=tok[:, None], attention_mask=mask, position_ids=step_pos,
                     past_key_values=cache, use_cache=True, **step_masks).last_hidden_state[:, -1]
    eng.stop_on_nonfinite(bad.nonzero()[:, 0], idx, samples, "generation")
    return out_ids, acc.result() if stats else [{}] * B


@torch.inference_mode()
def generate(eng, samples: Sequence[Sample], batches: list[list[int]], max_new_tokens: int = MAX_NEW_TOKENS,
             stats: bool = False, padding_side: str = "left", progress: bool = False) -> list[Generation]:
    """One Generation per sample of the planned batches, in index order, by `eng` (a `probes.engine.Engine`:
    its batches, forward, vocabulary statistics and stop tokens)."""
    done: list[tuple[int, list[int], dict]] = []     # decoded after the loop: the tokenizer stays on one thread
    bar = tqdm(total=len(batches), desc="generate", unit="batch", disable=not progress, leave=False)
    for idx, batch, image_keys in eng.stream(samples, batches, False, padding_side):
        out_ids, per_sample = _decode_batch(eng, samples, idx, batch, image_keys, max_new_tokens, stats,
                                            padding_side)
        for j, (i, ids) in enumerate(zip(idx, out_ids.tolist())):
            done.append((i, [t for t in ids if t >= 0], per_sample[j]))
        bar.update()
    bar.close()
    results: dict[int, Generation] = {}
    for i, ids, per in done:
        g = Generation(i, ids, eng.tokenizer.decode(ids, skip_special_tokens=True),
                       bool(ids) and ids[-1] in eng.stop_ids, n_steps=len(ids))
        if stats:
            g.stats = {k: v for k, v in per.items() if k != "n_positions"}
        results[i] = g
    return [results[i] for i in sorted(results)]
