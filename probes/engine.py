"""The batched probe engine: output-distribution statistics of one checkpoint over a set of samples.

Two modes, both exact (no sampling, no approximation), both batched:

- teacher-forced: the checkpoint's chat template with the reference caption as the assistant turn; the
  base model runs to hidden states, only the positions that predict caption tokens are gathered, and the
  output projection is applied to those rows in vocabulary chunks with an online log-sum-exp, so memory
  is bounded by `chunk_elems` and never grows as sequence x vocabulary.
- generation (the study's definition, `probes.decode`): greedy decoding with a KV cache from the prompt
  (image + instruction), up to `max_new_tokens`, statistics at every step including the stop token's.

The statistics are defined in `probes.stats`. The engine puts the parts together: `probes.batching` (plan,
encoding, preparation ahead), `probes.forward` (the forward with cached image features, the caption
positions), `probes.vocab` (the chunked reduction over the vocabulary) and `probes.decode`.

    eng = Engine(model, processor, token_sets=("number",))
    per_sample = eng.teacher_forced(samples, batch_size=32)     # {sample index: {probe: value, ...}}
    gens = eng.generate(samples, batch_size=32, max_new_tokens=256, stats=True)
    gens[0].text, gens[0].stats["number_mass"]
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from training.chat import tokenizer_of
from training.families import family_of_model

from . import decode
from .batching import Batcher, EncodeCache, default_workers, processor_key
from .captions import Sample
from .forward import Forward
from .stats import NonFiniteLogits, SampleAccumulator, VocabStats, probe_names, vocab_stats
from .tokensets import decoded_vocab, token_set
from .vision_cache import VisionCache
from .vocab import DEFAULT_CHUNK_ELEMS, Counter


class Engine:
    """One loaded checkpoint (model + its processor) ready to probe or generate in batches.

    Speed (none of it changes a number; the tests check each against the per-sample reference):
    samples are encoded by a memoising `Encoder` (exactly `training.chat.encode`'s tensors); on a GPU the
    next batches are encoded while the model runs, by `workers` DataLoader processes into pinned memory
    (default: up to 8) or else by a thread `prefetch` batches ahead (on a CPU both default to off: the
    preprocessing and the model share the same cores, and the benchmark measured no gain there);
    `encode_cache` shares encodings and `vision_cache` image features across the checkpoints of a run;
    `compile` compiles each decoder layer (for GPUs; batch and sequence shapes vary, so dynamic=True).
    `counter` is told of every logits block the vocabulary statistics make (`probes.vocab.Counter`).
    """

    def __init__(self, model: nn.Module, processor, *, token_sets: Sequence[str] = ("number",),
                 set_ids: dict[str, list[int]] | None = None, chunk_elems: int = DEFAULT_CHUNK_ELEMS,
                 encode_cache: EncodeCache | None = None, vision_cache: VisionCache | None = None,
                 prefetch: int | None = None, workers: int | None = None, compile: bool = False,
                 counter: Counter | None = None):
        self.model, self.processor = model.eval(), processor
        self.tokenizer = tokenizer_of(processor)
        self.family = family_of_model(model)
        proc_key = processor_key(processor) if (encode_cache or vision_cache) is not None else None
        self.forward = Forward(model, self.family, vision_cache=vision_cache, proc_key=proc_key)
        head = model.get_output_embeddings()
        self.weight, self.bias = head.weight, getattr(head, "bias", None)
        self.device, self.dtype = self.forward.device, self.forward.dtype
        self.chunk_elems, self.counter = chunk_elems, counter
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        cuda = self.device.type == "cuda"
        self.inputs = Batcher(processor, self.family, self.pad_id, encode_cache=encode_cache, proc_key=proc_key,
                              prefetch=(2 if cuda else 0) if prefetch is None else prefetch,
                              workers=default_workers(self.device) if workers is None else workers, pin=cuda)
        if set_ids is None:
            vocab = decoded_vocab(tok) if token_sets else []
            set_ids = {n: token_set(tok, n, vocab) for n in token_sets}
        self.set_ids = set_ids
        # ids only: the rows are gathered from the live weights at every use, so an engine over a model that is
        # being trained (the drift monitor) sees its current weights
        self._set_idx = {n: torch.tensor(ids, dtype=torch.long, device=self.device) for n, ids in set_ids.items()}
        self.probe_names = probe_names(set_ids)
        self.stop_ids = decode.stop_token_ids(model, processor)
        if compile:
            compile_decoder_layers(model, self.family)

    # -- inputs (probes.batching) ------------------------------------------------------------------
    def plan(self, samples: Sequence[Sample], batch_size: int, with_answer: bool) -> list[list[int]]:
        return self.inputs.plan(samples, batch_size, with_answer)

    def encode(self, sample: Sample, with_answer: bool):
        return self.inputs.encode_samples([sample], with_answer)[0]

    def stream(self, samples: Sequence[Sample], batches: list[list[int]], with_answer: bool,
               padding_side: str) -> Iterator[tuple[list[int], dict, list[str]]]:
        return self.inputs.stream(samples, batches, with_answer, padding_side)

    # -- statistics --------------------------------------------------------------------------------
    def stats(self, hidden: torch.Tensor, want_argmax: bool = False) -> VocabStats:
        sets = {n: (self.weight[i], None if self.bias is None else self.bias[i]) for n, i in self._set_idx.items()}
        return vocab_stats(hidden, self.weight, self.bias, sets, want_argmax=want_argmax,
                           chunk_elems=self.chunk_elems, counter=self.counter)

    def stop_on_nonfinite(self, owners: torch.Tensor, idx: list[int], samples: Sequence[Sample], what: str) -> None:
        """Stop, naming the first sample, when any row had NaN or infinite logits (`owners`: the batch rows
        of those rows); a number computed from them would silently poison a table."""
        if owners.numel():
            s = samples[idx[int(owners[0])]]
            raise NonFiniteLogits(f"sample {s.id!r}: NaN or infinite logits ({what}, {self.dtype}); the weights "
                                  "hold NaN/inf or the arithmetic overflows")

    # -- the two modes -----------------------------------------------------------------------------
    @torch.inference_mode()
    def teacher_forced(self, samples: Sequence[Sample], batch_size: int = 32, padding_side: str = "right",
                       batches: list[list[int]] | None = None, progress: bool = False) -> dict[int, dict]:
        """{sample index: {probe: value, "n_positions": int}} for the given samples (or planned batches)."""
        batches = batches if batches is not None else self.plan(samples, batch_size, True)
        out: dict[int, dict] = {}
        bar = tqdm(total=len(batches), desc="teacher-forced", unit="batch", disable=not progress, leave=False)
        for idx, batch, image_keys in self.stream(samples, batches, True, padding_side):
            rows, seg = self.forward.caption_rows(samples, idx, batch, image_keys)   # (sample, position) order
            probes = self.stats(rows).probes()
            acc = SampleAccumulator(self.probe_names, len(idx), self.device)
            acc.add(seg, probes)
            self.stop_on_nonfinite(seg[~torch.stack([v.isfinite() for v in probes.values()]).all(0)], idx, samples,
                                   "teacher-forced")
            for i, r in zip(idx, acc.result()):
                out[i] = r
            bar.update()
        bar.close()
        return out

    def generate(self, samples: Sequence[Sample], batch_size: int = 32, max_new_tokens: int = decode.MAX_NEW_TOKENS,
                 stats: bool = False, padding_side: str = "left", batches: list[list[int]] | None = None,
                 progress: bool = False) -> list[decode.Generation]:
        """Greedy decoding with a KV cache for each sample's prompt (image + instruction), batched.

        Returns one Generation per sample, in the order of `samples` (or of the planned batches' indices).
        With stats=True each carries the per-sample probe values over its steps (EOS step included).
        """
        batches = batches if batches is not None else self.plan(samples, batch_size, False)
        return decode.generate(self, samples, batches, max_new_tokens, stats, padding_side, progress)


def compile_decoder_layers(model: nn.Module, family) -> None:
    """torch.compile each LM decoder layer in place (regional compilation: one graph serves every layer;
    dynamic shapes, since batches and sequence lengths vary). For GPUs; numerics are the layers' own up to
    kernel fusion, which the GPU parity test bounds."""
    for layer in model.get_submodule(family.layers):
        layer.compile(dynamic=True)
