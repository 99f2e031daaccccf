"""Task signatures: the answer tokens a task's training data over-uses relative to the caption corpus.

The counting-bias probe asks how much probability a checkpoint puts on number tokens while it describes
ordinary images; a signature generalises "number tokens" to any task: the tokens its answers are made of,
more than captions are. The mass a checkpoint puts on a task's signature over the captions
(`sig_<task>_mass`, a token set like `number`) then shows whether training that task, or any other,
pulls the caption distribution towards that task's answers.

Counting. Answers (the gpt turns of the task's training file) and captions (the probe's caption set) are
tokenised exactly as the assistant turn of the chat template (the tokens the probes score: the template's
assistant prefix is not counted); special and added tokens never count. y_t,w and y_c,w are the counts of
token w in the answers and in the captions, n_t and n_c their totals.

Weighted log-odds with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words",
eq. 16-18), the prior being the pooled frequencies scaled to a total mass a_0:

    a_w     = a_0 (y_t,w + y_c,w) / (n_t + n_c),          a_0 = prior x (n_t + n_c)
    delta_w = log[(y_t,w + a_w) / (n_t + a_0 - y_t,w - a_w)] - log[(y_c,w + a_w) / (n_c + a_0 - y_c,w - a_w)]
    var_w  ~= 1 / (y_t,w + a_w) + 1 / (y_c,w + a_w),       z_w = delta_w / sqrt(var_w)

The signature is every token with z_w >= z_min and y_t,w >= min_count, the top_k largest z_w first.
Defaults: prior 0.1, z_min 1.96 (over-represented at the 5% level, one token at a time), min_count 2,
top_k 20. A task with no such token has no signature (reported, not probed).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.manifest import ManifestError
from training.manifest import task_files as run_task_files
from training.records import DataError, load_records, record_turns

from .tokensets import decoded_vocab, is_number_token

PRIOR, Z_MIN, MIN_COUNT, TOP_K = 0.1, 1.96, 2, 20
PREFIX = "sig_"


class SignatureError(ValueError):
    """Task data for a signature that cannot be found or read; the message names the task and file."""


@dataclass
class Signature:
    task: str
    source: str                    # the training file the answers came from
    n_answers: int
    n_tokens: int                  # answer tokens counted (n_t)
    n_ref_tokens: int              # caption tokens counted (n_c)
    tokens: list[dict] = field(default_factory=list)   # {"id", "token", "z", "delta", "count", "count_ref"}

    @property
    def name(self) -> str:
        return set_name(self.task)

    @property
    def ids(self) -> list[int]:
        return sorted(t["id"] for t in self.tokens)

    def number_share(self) -> float:
        """The fraction of the signature's tokens that are number tokens (the study's rule)."""
        return sum(is_number_token(t["token"]) for t in self.tokens) / max(len(self.tokens), 1)


def set_name(task: str) -> str:
    """The token-set name of a task's signature: sig_<task> (lower case; other characters become _)."""
    return PREFIX + (re.sub(r"[^a-z0-9_]+", "_", task.lower()).strip("_") or "task")


# -- tokens as the assistant turn has them ---------------------------------------------------------
def assistant_tokens(processor, texts: list[str]) -> list[list[int]]:
    """Each text's token ids as the chat template's assistant turn (training.chat.encode) would have them,
    without the template's own tokens before the answer."""
    from training.chat import answer_affixes, prompt_text, tokenizer_of

    tok = tokenizer_of(processor)
    head = prompt_text(processor, "x", with_image=False) + answer_affixes(processor)[0]
    h_ids = tok(head, add_special_tokens=False)["input_ids"]
    full = tok([head + t for t in texts], add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for t, ids in zip(texts, full):
        # a merge across the boundary (rare): fall back to the text alone
        out.append(ids[len(h_ids):] if ids[:len(h_ids)] == h_ids else tok(t, add_special_tokens=False)["input_ids"])
    return out


def token_counts(processor, texts: list[str], vocab_size: int) -> np.ndarray:
    ids = [i for seq in assistant_tokens(processor, texts) for i in seq if 0 <= i < vocab_size]
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=vocab_size).astype(np.float64)


def log_odds(y_t: np.ndarray, y_c: np.ndarray, prior: float = PRIOR) -> tuple[np.ndarray, np.ndarray]:
    """(delta, z) per token: Monroe et al.'s log-odds ratio of corpus t over corpus c with the informative
    Dirichlet prior of total mass prior x (n_t + n_c) spread as the pooled frequencies. NaN where a token
    occurs in neither corpus."""
    y_t, y_c = np.asarray(y_t, np.float64), np.asarray(y_c, np.float64)
    n_t, n_c = y_t.sum(), y_c.sum()
    if n_t <= 0 or n_c <= 0:
        raise SignatureError(f"log-odds need tokens in both corpora (task {n_t:.0f}, captions {n_c:.0f})")
    if prior <= 0:
        raise SignatureError(f"the prior's mass must be positive, got {prior}")
    a0 = prior * (n_t + n_c)
    a = a0 * (y_t + y_c) / (n_t + n_c)
    with np.errstate(divide="ignore", invalid="ignore"):
        delta = (np.log((y_t + a) / (n_t + a0 - y_t - a)) - np.log((y_c + a) / (n_c + a0 - y_c - a)))
        z = delta / np.sqrt(1.0 / (y_t + a) + 1.0 / (y_c + a))
    seen = (y_t + y_c) > 0
    return np.where(seen, delta, np.nan), np.where(seen, z, np.nan)


def derive(task: str, answers: list[str], captions: list[str], processor, *, prior: float = PRIOR,
           z_min: float = Z_MIN, min_count: int = MIN_COUNT, top_k: int = TOP_K, source: str = "",
           vocab: list | None = None) -> Signature:
    """The signature of a task from its training answers against the captions (see the module docstring)."""
    from training.chat import tokenizer_of

    tok = tokenizer_of(processor)
    V = len(tok)
    vocab = vocab if vocab is not None else decoded_vocab(tok)
    y_t, y_c = token_counts(processor, answers, V), token_counts(processor, captions, V)
    special = np.array([v is None for v in vocab] + [True] * (V - len(vocab)))[:V]
    y_t[special], y_c[special] = 0, 0
    delta, z = log_odds(y_t, y_c, prior)
    ok = ~np.isnan(z) & (z >= z_min) & (y_t >= min_count)
    order = [i for i in np.argsort(-np.where(ok, z, -np.inf), kind="stable")[:top_k] if ok[i]]
    sig = Signature(task, source, len(answers), int(y_t.sum()), int(y_c.sum()))
    sig.tokens = [{"id": int(i), "token": vocab[i], "z": float(z[i]), "delta": float(delta[i]),
                   "count": int(y_t[i]), "count_ref": int(y_c[i])} for i in order]
    return sig


# -- where a run's task answers are ----------------------------------------------------------------
def read_answers(path: str | os.PathLike, max_records: int | None = None) -> list[str]:
    """Every gpt turn of a LLaVA JSON / JSONL training file."""
    try:
        records = load_records(path, max_records)
        return [a for i, r in enumerate(records) for _, a in record_turns(r, f"{path} record {i}")]
    except DataError as e:
        raise SignatureError(str(e)) from None


def task_files(manifest: dict, tasks: list[str] | None = None, files: dict[str, str] | None = None) -> dict[str, Path]:
    """task -> training file: `files` (NAME=PATH from the command line) first, else the file training resolved
    (run.json "task_files", training.manifest). Default tasks: run.json's "tasks"."""
    files = dict(files or {})
    tasks = list(dict.fromkeys(tasks or list(manifest.get("tasks") or []) or list(files)))
    if not tasks:
        raise SignatureError("no tasks for signatures: run.json names none; pass --signature-file NAME=PATH")
    out: dict[str, Path] = {}
    resolved = None
    for t in tasks:
        if t in files:
            out[t] = Path(files[t])
            continue
        try:
            resolved = resolved if resolved is not None else run_task_files(manifest)
        except ManifestError as e:
            raise SignatureError(f"signature of task {t!r}: its training data cannot be found ({e}); "
                                 f"pass --signature-file {t}=PATH") from None
        if t not in resolved:
            raise SignatureError(f"signature of task {t!r}: the run's data has no training file for it; "
                                 f"pass --signature-file {t}=PATH")
        out[t] = Path(resolved[t]["train"])
    return out


def derive_all(manifest: dict, captions: list[str], processor, tasks: list[str] | None = None,
               files: dict[str, str] | None = None, max_records: int | None = None, **kw) -> list[Signature]:
    from training.chat import tokenizer_of

    vocab = decoded_vocab(tokenizer_of(processor))
    return [derive(t, read_answers(p, max_records), captions, processor, source=str(p), vocab=vocab, **kw)
            for t, p in task_files(manifest, tasks, files).items()]


def to_json(sigs: list[Signature], settings: dict, reference: dict) -> dict:
    return {"definition": "Monroe et al. 2008 weighted log-odds, informative Dirichlet prior (probes/signatures.py)",
            "settings": settings, "reference": reference,
            "tasks": {s.task: {"set": s.name, "source": s.source, "n_answers": s.n_answers, "n_tokens": s.n_tokens,
                               "n_ref_tokens": s.n_ref_tokens, "number_share": s.number_share(),
                               "tokens": s.tokens} for s in sigs}}


def write_json(path: str | os.PathLike, sigs: list[Signature], settings: dict, reference: dict) -> Path:
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(to_json(sigs, settings, reference), f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)
    return path
