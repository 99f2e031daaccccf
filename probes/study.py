"""The study's probe statistics, defined as its own script computes them (LMM_CL,
scripts/analysis/output_logit_single_model_inference.py), so that our numbers can sit next to the paper's.

Greedy `model.generate(..., output_scores=True)` from each sample's prompt (the checkpoint's chat template with
the image and the first human turn); the scores are the logits AFTER the generation config's processors (a
checkpoint's repetition penalty changes them). At every step t of a sample, with z_t its scores, p_t =
softmax(z_t) and S the token set (`number_study`):

    total_t = sum_{i in S} p_t[i]      top_t = max_{i in S} p_t[i]      logit_t = max_{i in S} z_t[i]

Per sample, over its steps (every step `generate` returns for it, the EOS step included):
avg_total_number_prob / max_total_number_prob = mean / max of total_t, avg_max_number_prob /
max_max_number_prob = mean / max of top_t, avg_max_number_logit / max_number_logit = mean / max of logit_t,
num_generation_steps = the step count. Over samples the script reports mean and std (`summarize`).

    per_sample = study_statistics(model, processor, samples, number_ids, batch_size=8, max_new_tokens=256)

The script generates one sample at a time; here samples are batched with left padding, which gives every row
the scores it has alone (each row's steps end at its own EOS). A generation config whose processors read the
prompt's padded ids or length (`batching_is_exact`) would break that, so such a checkpoint runs one sample
at a time.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from training.chat import collate, encode, tokenizer_of
from training.families import family_of_model

from .batching import estimate_lengths
from .captions import Sample

# The script's statistic names, in its order.
STATISTICS = ("avg_max_number_logit", "max_number_logit", "avg_total_number_prob", "max_total_number_prob",
              "avg_max_number_prob", "max_max_number_prob", "num_generation_steps")
STUDY_MAX_NEW_TOKENS = 256


def batching_is_exact(gc) -> bool:
    """False when a logits processor of this generation config reads the padded prompt (its ids or its
    length), so that a left-padded row's scores could differ from the row's own. (transformers skips the
    left padding in the repetition penalty; min_new_tokens counts from the padded length, which is exact.)"""
    get = lambda k: getattr(gc, k, None)  # noqa: E731
    return not (get("no_repeat_ngram_size") or get("min_length") or get("sequence_bias") or get("bad_words_ids")
                or get("guidance_scale") not in (None, 1))


def eos_ids(model) -> set[int]:
    """The tokens that end a sample's generation, as `generate` decides it: the generation config's EOS."""
    eos = model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else list(eos or []))


def step_statistics(scores: Sequence[torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """(steps, batch) tensors of total_t, top_t and logit_t from generate's per-step scores (batch, vocab)."""
    total, top, logit = [], [], []
    for z in scores:
        z = z.float()
        p = torch.softmax(z, dim=-1)[:, ids]
        total.append(p.sum(-1))
        top.append(p.max(-1).values)
        logit.append(z[:, ids].max(-1).values)
    return {k: torch.stack(v).double().cpu() for k, v in (("total", total), ("top", top), ("logit", logit))}


def reduce_steps(steps: dict[str, torch.Tensor], n_steps: Sequence[int]) -> list[dict]:
    """Per row b, the seven statistics over its first n_steps[b] steps."""
    out = []
    for b, n in enumerate(n_steps):
        total, top, logit = (steps[k][:n, b].numpy() for k in ("total", "top", "logit"))
        out.append({"avg_max_number_logit": float(np.mean(logit)), "max_number_logit": float(np.max(logit)),
                    "avg_total_number_prob": float(np.mean(total)), "max_total_number_prob": float(np.max(total)),
                    "avg_max_number_prob": float(np.mean(top)), "max_max_number_prob": float(np.max(top)),
                    "num_generation_steps": int(n)})
    return out


def steps_per_row(new_tokens: torch.Tensor, n_scores: int, eos: set[int]) -> list[int]:
    """Each row's own step count: up to and including its first EOS, else every step generate ran."""
    out = []
    for row in new_tokens.tolist():
        ends = [t for t, tok in enumerate(row[:n_scores]) if tok in eos]
        out.append(ends[0] + 1 if ends else n_scores)
    return out


def _to_device(batch: dict, device, dtype) -> dict:
    return {k: v.to(device, dtype=dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
            for k, v in batch.items()}


@torch.inference_mode()
def study_statistics(model, processor, samples: Sequence[Sample], set_ids: Sequence[int], *, batch_size: int = 8,
                     max_new_tokens: int = STUDY_MAX_NEW_TOKENS, progress: bool = False) -> list[dict]:
    """Per sample (in the order given): the script's seven statistics over its greedy generation steps."""
    model.eval()
    family, tok = family_of_model(model), tokenizer_of(processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    head = model.get_output_embeddings().weight
    ids = torch.tensor(sorted(set_ids), dtype=torch.long, device=head.device)
    eos = eos_ids(model)
    if not batching_is_exact(model.generation_config):
        batch_size = 1
    lengths = estimate_lengths(processor, samples, with_answer=False)
    order = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))     # similar lengths: little padding
    out: dict[int, dict] = {}
    for k in tqdm(range(0, len(order), batch_size), desc="study generate", unit="batch", disable=not progress,
                  leave=False, total=math.ceil(len(order) / batch_size)):
        idx = order[k:k + batch_size]
        exs = [encode(processor, samples[i].open_image(), samples[i].instruction) for i in idx]
        batch = collate(exs, family, pad_id, padding_side="left")
        for m in ("answer_mask", "eot_mask"):
            batch.pop(m)
        batch = _to_device(batch, head.device, head.dtype)
        gen = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             return_dict_in_generate=True, output_scores=True)
        new = gen.sequences[:, batch["input_ids"].shape[1]:]
        rows = reduce_steps(step_statistics(gen.scores, ids), steps_per_row(new, len(gen.scores), eos))
        out.update(zip(idx, rows))
    return [out[i] for i in range(len(samples))]


# -- `python -m probes.run --profile study` ----------------------------------------------------------
def configure(ap, args, extras) -> None:
    """The study profile's settings on probes.run's parsed arguments (`extras`: its drift options); options
    that would change its definition are refused rather than silently ignored."""
    clash = [opt for opt, bad in (("--mode", args.mode not in (None, "generate")), ("--token-sets", args.token_sets),
                                  ("--sample random", args.sample != "first"), ("--drift", extras.drift),
                                  ("--signatures", extras.signatures)) if bad]
    if clash:
        ap.error(f"--profile study is the study script's definition (generation, number_study, first N records); "
                 f"it does not take {', '.join(clash)}")
    args.mode, args.token_sets = "generate", "number_study"


def probe_values(model, processor, samples: Sequence[Sample], set_ids: Sequence[int], mine: Sequence[int], *,
                 batch_size: int, max_new_tokens: int, progress: bool = False) -> dict[int, dict]:
    """{sample index: the seven statistics + n_positions} for the samples `mine` (this process's share);
    samples are independent, so any split over processes gives the same values."""
    per = study_statistics(model, processor, [samples[i] for i in mine], set_ids, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, progress=progress)
    return {i: v | {"n_positions": v["num_generation_steps"]} for i, v in zip(mine, per)}
