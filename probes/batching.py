"""Samples to collated batches: the plan (longest first), encoding (memoised, shared across the checkpoints
of a run) and preparation ahead of use (worker processes or a prefetch thread). None of it changes a number.

    inputs = Batcher(processor, family, pad_id, encode_cache=EncodeCache())
    for idx, batch, image_keys in inputs.stream(samples, inputs.plan(samples, 32, True), True, "right"):
        ...      # batch: `training.chat.collate`'s CPU tensors (answer and eot masks included)
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from training.chat import EncodingError, collate, tokenizer_of

from .captions import CaptionDataError, Sample
from .encoding import Encoder
from .tokensets import vocab_fingerprint


class EncodeCache:
    """Encoded samples shared by the checkpoints of a run: they share one processor, so the image
    preprocessing and tokenisation (most of the time on small models) are done once. Keyed by the
    processor's identity and the sample's content; stops storing beyond `max_bytes` of tensors.
    Also holds one memoising `Encoder` per processor key, and the batch plans."""

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes, self.bytes, self.store = max_bytes, 0, {}
        self.encoders: dict[str, Encoder] = {}
        self.plans: dict[tuple, list[list[int]]] = {}

    def get(self, key):
        return self.store.get(key)

    def put(self, key, ex) -> None:
        size = sum(t.nbytes for t in [ex.input_ids, *ex.image_inputs.values(), *ex.token_type_ids.values()]
                   if torch.is_tensor(t))
        if key not in self.store and self.bytes + size <= self.max_bytes:
            self.store[key] = ex
            self.bytes += size

    def encoder(self, processor, key: str) -> Encoder:
        if key not in self.encoders:
            self.encoders[key] = Encoder(processor)
        return self.encoders[key]


def is_text_only(processor) -> bool:
    """A text-only LM's processor is its tokenizer (no image processor): it probes the instruction and caption
    text alone, and needs no images."""
    return not hasattr(processor, "image_processor")


def processor_key(processor) -> str:
    """What makes two processors encode alike: vocabulary, chat template, image processor settings."""
    tok = tokenizer_of(processor)
    parts = [vocab_fingerprint(tok), str(getattr(processor, "chat_template", None) or tok.chat_template),
             processor.image_processor.to_json_string() if hasattr(processor, "image_processor") else "",
             type(processor).__name__]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def default_workers(device: torch.device) -> int:
    """Preprocessing processes: none on a CPU (the cores run the model), several beside a GPU: up to 8, at
    most half the cores this process may share with the other ranks on its node (torchrun)."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(8, cores // (2 * ranks)))


def estimate_lengths(processor, samples: Sequence[Sample], with_answer: bool) -> list[int]:
    """Token counts for sorting: text tokens plus image tokens from the image header (the processor's
    own count where it has one), without decoding any image."""
    tok = tokenizer_of(processor)
    texts = [s.instruction + (" " + (s.caption or "") if with_answer else "") for s in samples]
    text_len = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    sizes = [s.image_size() for s in samples]
    image_len = [0] * len(samples)
    with_image = [i for i, sz in enumerate(sizes) if sz]
    counter = getattr(processor, "_get_num_multimodal_tokens", None)
    if with_image and counter is not None:
        try:
            counts = counter(image_sizes=[sizes[i] for i in with_image]).num_image_tokens
            for i, c in zip(with_image, counts):
                image_len[i] = int(c)
        except Exception:  # a processor without a usable count: sort by text, then image area
            for i in with_image:
                image_len[i] = int(math.sqrt(sizes[i][0] * sizes[i][1]))
    return [a + b for a, b in zip(text_len, image_len)]


class _Batches(torch.utils.data.Dataset):
    """Planned batches for DataLoader workers: item k is batch k, encoded and collated."""

    def __init__(self, prepare, batches):
        self.prepare, self.batches = prepare, batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return self.prepare(self.batches[k])


class Batcher:
    """One processor's batches: encoded by a memoising `Encoder` (exactly `training.chat.encode`'s
    tensors; shared through `encode_cache`), prepared ahead by `workers` DataLoader processes into pinned
    memory (`pin`), else by a thread `prefetch` batches ahead, else in line."""

    def __init__(self, processor, family, pad_id: int, *, encode_cache: EncodeCache | None = None,
                 proc_key: str | None = None, prefetch: int = 0, workers: int = 0, pin: bool = False):
        self.processor, self.family, self.pad_id = processor, family, pad_id
        self.cache, self.proc_key = encode_cache, proc_key
        self.encoder = encode_cache.encoder(processor, proc_key) if encode_cache is not None else Encoder(processor)
        self.prefetch, self.workers, self.pin = prefetch, workers, pin
        self.text_only = is_text_only(processor)

    def _key(self, sample: Sample, with_answer: bool):
        return (self.proc_key, sample.id, sample.image_ref, sample.instruction,
                sample.caption if with_answer else None)

    def encode_samples(self, samples: Sequence[Sample], with_answer: bool) -> list:
        """The Examples (`training.chat.encode`'s) for these samples: from the run's cache, else encoded."""
        out, todo = [None] * len(samples), []
        for j, s in enumerate(samples):
            if with_answer and s.caption is None:
                raise CaptionDataError(f"sample {s.id!r} has no caption to teacher-force")
            hit = self.cache.get(self._key(s, with_answer)) if self.cache is not None else None
            if hit is not None:
                out[j] = hit
            else:
                todo.append(j)
        if todo:
            items = [(None if self.text_only else samples[j].open_image(), samples[j].instruction,
                      samples[j].caption if with_answer else None) for j in todo]
            try:
                exs = self.encoder.encode_many(items)
            except EncodingError:        # find and name the sample
                for j, item in zip(todo, items):
                    try:
                        self.encoder.encode_many([item])
                    except EncodingError as e:
                        raise CaptionDataError(f"sample {samples[j].id!r}: {e}") from e
                raise
            for j, ex in zip(todo, exs):
                out[j] = ex
                if self.cache is not None and samples[j].image_ref:   # in-memory images have no stable identity
                    self.cache.put(self._key(samples[j], with_answer), ex)
        return out

    def prepare(self, samples: Sequence[Sample], idx: list[int], with_answer: bool, padding_side: str,
                pin: bool = False) -> tuple[list[int], dict, list[str]]:
        """(indices, collated CPU batch, image input keys) of one batch."""
        exs = self.encode_samples([samples[i] for i in idx], with_answer)
        batch = collate(exs, self.family, self.pad_id, padding_side)
        if pin:
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        keys = sorted({k for e in exs for k in e.image_inputs})
        return idx, batch, keys

    def stream(self, samples: Sequence[Sample], batches: list[list[int]], with_answer: bool,
               padding_side: str) -> Iterator[tuple[list[int], dict, list[str]]]:
        """`prepare`'s triple per planned batch, prepared ahead of use."""
        if self.workers > 0 and len(batches) > 1:
            prep = partial(self.prepare, samples, with_answer=with_answer, padding_side=padding_side, pin=False)
            loader = torch.utils.data.DataLoader(_Batches(prep, batches), batch_size=None, shuffle=False,
                                                 num_workers=min(self.workers, len(batches)), pin_memory=self.pin,
                                                 prefetch_factor=2)
            yield from loader
            return
        make = lambda idx: self.prepare(samples, idx, with_answer, padding_side, self.pin)  # noqa: E731
        if self.prefetch <= 0 or len(batches) <= 1:
            yield from map(make, batches)
            return
        with ThreadPoolExecutor(1, thread_name_prefix="probe-prefetch") as pool:
            todo, ahead = iter(batches), deque()
            for idx in todo:
                ahead.append(pool.submit(make, idx))
                if len(ahead) > self.prefetch:
                    break
            while ahead:
                fut = ahead.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    ahead.append(pool.submit(make, nxt))
                yield fut.result()

    def plan(self, samples: Sequence[Sample], batch_size: int, with_answer: bool) -> list[list[int]]:
        """Batches of sample indices, longest first, so that padding is small (see `estimate_lengths`).
        The checkpoints of a run share the plan (kept in the encode cache), so LM-only stages also meet
        the same batches in the vision cache."""
        key = None
        if self.cache is not None and all(s.image_ref or s.image is None for s in samples):
            key = (self.proc_key, batch_size, with_answer, tuple(self._key(s, with_answer)[1:] for s in samples))
            if key in self.cache.plans:
                return [list(b) for b in self.cache.plans[key]]
        lengths = estimate_lengths(self.processor, samples, with_answer)
        order = sorted(range(len(samples)), key=lambda i: (-lengths[i], i))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if key is not None:
            self.cache.plans[key] = [list(b) for b in batches]
        return batches
