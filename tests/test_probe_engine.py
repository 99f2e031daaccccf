"""The probe engine against a slow, independent per-sample reference (full softmax over the vocabulary).

The reference runs one sample at a time through the model's own forward (`model(...).logits`), takes the
full softmax in float64 and loops over positions / generation steps in plain Python; generation is
re-run from scratch at every step (no KV cache). The engine must agree within 1e-5 for every batch size
and padding side, on all three families, and its greedy tokens must be identical.

The tiny random models are made more decisive (lm_head scaled) and their EOS is planted on a frequent
token's direction, so that sequences stop at different steps and the per-row stopping is exercised.
"""
import copy
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from probes.batching import EncodeCache
from probes.captions import Sample
from probes.engine import Engine
from probes.stats import vocab_stats
from probes.vision_cache import VisionCache
from training.chat import collate, continue_extra, encode, tokenizer_of
from training.families import FAMILIES

from .conftest import FAMILY_NAMES

N_SAMPLES, MAX_NEW, TOL = 33, 20, 1e-5
WORDS = ("a red square two blue circles there are 12 small dots the clock shows 10:45 cat Seventeen people "
         "stand in row of twenty chairs 3 1999 nine").split()


def make_samples(n=N_SAMPLES, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
        image = Image.new("RGB", (rng.randint(12, 80), rng.randint(12, 80)), tuple(rng.randrange(256) for _ in "rgb"))
        instr = rng.choice(["Describe the image.", "What is in the picture?", "Describe the image briefly."])
        out.append(Sample(f"s{i}", instr, caption, image, f"mem-{seed}-{i}"))   # a stable identity for the caches
    return out


def decisive_model(name, tiny_models, samples):
    """A copy of the tiny model with sharper logits and an EOS that some sequences reach early."""
    model, processor = tiny_models(name)
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    gens = Engine(model, processor).generate(samples, batch_size=N_SAMPLES, max_new_tokens=6)
    top = Counter(t for g in gens for t in g.token_ids[1:]).most_common(3)[-1][0]
    with torch.no_grad():
        model.lm_head.weight[processor.tokenizer.eos_token_id] = model.lm_head.weight[top] * 1.05
    return model, processor


def ref_probs(logits, set_ids):
    p = torch.softmax(logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    ps = p[..., set_ids]
    return ps.sum(-1), ps.max(-1).values, -(p * logp).sum(-1)


def ref_teacher_forced(model, processor, family, sample, set_ids):
    ex = encode(processor, sample.open_image(), sample.instruction, sample.caption)
    batch = collate([ex], family, tokenizer_of(processor).pad_token_id)
    batch.pop("eot_mask")
    answer = batch.pop("answer_mask")[0]
    with torch.no_grad():
        logits = model(**batch).logits[0]
    masses, maxes, ents = [], [], []
    for t in range(logits.shape[0]):
        if t + 1 < logits.shape[0] and answer[t + 1]:
            m, x, e = ref_probs(logits[t], set_ids)
            masses.append(float(m)), maxes.append(float(x)), ents.append(float(e))
    return {"number_mass": sum(masses) / len(masses), "number_max_prob": max(maxes),
            "entropy": sum(ents) / len(ents), "n_positions": len(masses)}


def ref_generate(model, processor, family, sample, set_ids, stop_ids, max_new):
    ex = encode(processor, sample.open_image(), sample.instruction)
    ids, tokens, masses, maxes, ents = ex.input_ids.clone(), [], [], [], []
    for _ in range(max_new):
        extra = {k: torch.cat([v, continue_extra(v, len(ids) - len(v))]) for k, v in ex.token_type_ids.items()}
        step = type(ex)(ids, ex.prompt_len, 0, 0, ex.image_inputs, extra)
        batch = collate([step], family, tokenizer_of(processor).pad_token_id)
        batch.pop("answer_mask"), batch.pop("eot_mask")
        with torch.no_grad():
            logits = model(**batch).logits[0, -1]
        m, x, e = ref_probs(logits, set_ids)
        masses.append(float(m)), maxes.append(float(x)), ents.append(float(e))
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if tok in stop_ids:
            break
        ids = torch.cat([ids, torch.tensor([tok])])
    return tokens, {"number_mass": sum(masses) / len(masses), "number_max_prob": max(maxes),
                    "entropy": sum(ents) / len(ents)}


@pytest.fixture(scope="module")
def setup(tiny_models):
    cache = {}

    def get(name):
        if name not in cache:
            samples = make_samples()
            model, processor = decisive_model(name, tiny_models, samples)
            eng = Engine(model, processor)
            fam, ids = FAMILIES[name], eng.set_ids["number"]
            tf = [ref_teacher_forced(model, processor, fam, s, ids) for s in samples]
            gen = [ref_generate(model, processor, fam, s, ids, eng.stop_ids, MAX_NEW) for s in samples]
            cache[name] = (samples, model, processor, tf, gen)
        return cache[name]
    return get


def max_diff(got: dict, ref: dict) -> float:
    return max(abs(got[k] - ref[k]) for k in ("number_mass", "number_max_prob", "entropy"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize("side", ["left", "right"])
def test_teacher_forced_matches_per_sample_reference(name, batch_size, side, setup):
    samples, model, processor, ref, _ = setup(name)
    chunk = 1 << 24 if batch_size != 7 else 300     # batch 7 runs the row- and vocabulary-chunked path
    got = Engine(model, processor, chunk_elems=chunk).teacher_forced(samples, batch_size, padding_side=side)
    assert sorted(got) == list(range(len(samples)))
    for i, r in enumerate(ref):
        assert got[i]["n_positions"] == r["n_positions"], samples[i].id
        assert max_diff(got[i], r) < TOL, (samples[i].id, got[i], r)


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize("side", ["left", "right"])
def test_generation_matches_uncached_per_sample_reference(name, batch_size, side, setup):
    samples, model, processor, _, ref = setup(name)
    chunk = 1 << 24 if batch_size != 7 else 300
    gens = Engine(model, processor, chunk_elems=chunk).generate(samples, batch_size, max_new_tokens=MAX_NEW,
                                                                stats=True, padding_side=side)
    assert [g.index for g in gens] == list(range(len(samples)))
    for g, (tokens, r) in zip(gens, ref):
        assert g.token_ids == tokens, samples[g.index].id
        assert g.n_steps == len(tokens)
        assert max_diff(g.stats, r) < TOL, (samples[g.index].id, g.stats, r)
    lengths = {len(t) for t, _ in ref}
    assert len(lengths) > 2 and MAX_NEW in lengths, f"the planted EOS should stop rows at different steps: {lengths}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_optimisation_on_matches_the_references(name, side, setup):
    """Encode and vision caches shared by two engines (the second one reads every image's features and
    every encoding from them), a prefetch thread, row- and vocabulary-chunked statistics: both modes still
    agree with the per-sample references."""
    samples, model, processor, tf_ref, gen_ref = setup(name)
    enc, vis = EncodeCache(), VisionCache()
    for _ in range(2):
        eng = Engine(model, processor, chunk_elems=300, encode_cache=enc, vision_cache=vis, prefetch=2)
        got = eng.teacher_forced(samples, 7, padding_side=side)
        for i, r in enumerate(tf_ref):
            assert got[i]["n_positions"] == r["n_positions"] and max_diff(got[i], r) < TOL, samples[i].id
        gens = eng.generate(samples, 7, max_new_tokens=MAX_NEW, stats=True, padding_side=side)
        for g, (tokens, r) in zip(gens, gen_ref):
            assert g.token_ids == tokens and max_diff(g.stats, r) < TOL, samples[g.index].id
    n = len(samples)         # first engine: all features computed; second: all read from the cache
    assert (vis.misses, vis.hits) == (2 * n, 2 * n) and len(enc.store) == 2 * n


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_generation_matches_hf_generate_with_scores(name, setup):
    from transformers import GenerationConfig

    samples, model, processor, _, _ = setup(name)
    eng = Engine(model, processor)
    gens = eng.generate(samples[:4], batch_size=4, max_new_tokens=MAX_NEW, stats=True)
    ids = torch.tensor(eng.set_ids["number"])
    for s, g in zip(samples[:4], gens):
        ex = encode(processor, s.open_image(), s.instruction)
        batch = collate([ex], FAMILIES[name], processor.tokenizer.pad_token_id)
        batch.pop("answer_mask"), batch.pop("eot_mask")
        cfg = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=sorted(eng.stop_ids),
                               pad_token_id=processor.tokenizer.pad_token_id)
        out = model.generate(**batch, generation_config=cfg, output_scores=True, return_dict_in_generate=True)
        assert out.sequences[0, ex.prompt_len:].tolist() == g.token_ids
        mass = sum(float(ref_probs(sc[0], ids)[0]) for sc in out.scores) / len(out.scores)
        assert abs(mass - g.stats["number_mass"]) < TOL


def test_vocab_stats_chunked_equals_direct():
    torch.manual_seed(0)
    h, w, b = torch.randn(37, 16), torch.randn(103, 16) * 3, torch.randn(103)
    sets = {"odd": torch.arange(1, 103, 2), "few": torch.tensor([0, 5, 99])}
    direct = h @ w.T + b
    p = torch.softmax(direct.double(), -1)
    for chunk in (1 << 20, 500, 7, 1):            # one block; row x vocab blocks with a partial last one
        vs = vocab_stats(h, w, b, {k: (w[v], b[v]) for k, v in sets.items()}, want_argmax=True, chunk_elems=chunk)
        torch.testing.assert_close(vs.lse.double(), torch.logsumexp(direct.double(), -1), atol=1e-5, rtol=0)
        torch.testing.assert_close(vs.entropy.double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
        assert torch.equal(vs.argmax, direct.argmax(-1))
        probes = vs.probes()
        for k, v in sets.items():
            torch.testing.assert_close(probes[f"{k}_mass"].double(), p[:, v].sum(-1), atol=1e-5, rtol=0)
            torch.testing.assert_close(probes[f"{k}_max_prob"].double(), p[:, v].max(-1).values, atol=1e-5, rtol=0)


def test_vocab_stats_argmax_ties_take_the_first_index():
    h = torch.ones(1, 2)
    w = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [1.0, 1.0]])   # ids 1 and 3 tie
    for chunk in (100, 2, 1):
        assert vocab_stats(h, w, None, {}, want_argmax=True, chunk_elems=chunk).argmax.tolist() == [1]


class BlockSizes:
    """A `probes.vocab.Counter` that keeps the size of every logits block it is told of."""

    def __init__(self):
        self.sizes = []

    def add_logits(self, rows, cols, width):
        self.sizes.append(rows * cols)


def test_memory_is_bounded_by_the_chunk_not_by_positions_times_vocabulary():
    """No logits block larger than chunk_elems is ever made, however many positions are scored; the counter
    passed in is told of every block (the bench counts the output projection's FLOPs so)."""
    seen = BlockSizes()
    h, w = torch.randn(5000, 8), torch.randn(3000, 8)
    vocab_stats(h, w, None, {}, chunk_elems=1 << 16, counter=seen)
    assert max(seen.sizes) <= 1 << 16 and len(seen.sizes) > 1
    assert sum(seen.sizes) == 5000 * 3000           # every logit once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_gpu_fp32_matches_the_reference_and_bf16_runs(name, setup):
    samples, model, processor, tf_ref, gen_ref = setup(name)
    gpu = copy.deepcopy(model).to("cuda")
    eng = Engine(gpu, processor)
    got = eng.teacher_forced(samples, batch_size=32)
    assert max(max_diff(got[i], r) for i, r in enumerate(tf_ref)) < TOL
    gens = eng.generate(samples, batch_size=32, max_new_tokens=MAX_NEW, stats=True)
    assert [g.token_ids for g in gens] == [t for t, _ in gen_ref]
    bf16 = Engine(copy.deepcopy(model).to("cuda", torch.bfloat16), processor)
    low = bf16.teacher_forced(samples, batch_size=32)
    assert max(abs(low[i]["number_mass"] - r["number_mass"]) for i, r in enumerate(tf_ref)) < 0.05
    assert all(g.n_steps >= 1 for g in bf16.generate(samples, batch_size=32, max_new_tokens=8, stats=True))


def test_encode_cache_is_shared_only_by_identical_processors(tiny_models, tmp_path):
    from training.families.qwen2_5_vl import TINY_CORPUS, tiny_tokenizer

    model, processor = tiny_models("qwen2_5_vl")
    for i in range(3):
        Image.new("RGB", (20 + 9 * i, 30), (50 * i, 0, 0)).save(tmp_path / f"{i}.png")
    samples = [Sample(f"s{i}", "Describe the image.", f"{i} red squares", str(tmp_path / f"{i}.png"), f"{i}.png")
               for i in range(3)]
    cache = EncodeCache()
    first = Engine(model, processor, encode_cache=cache).teacher_forced(samples, 2)
    assert len(cache.store) == 3 and cache.bytes > 0
    calls = []
    eng = Engine(model, processor, encode_cache=cache)
    real = processor.__class__.__call__
    try:
        processor.__class__.__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
        assert eng.teacher_forced(samples, 2) == first and not calls      # all from the cache
    finally:
        processor.__class__.__call__ = real
    other_model, other = FAMILIES["qwen2_5_vl"].build_tiny(seed=0, tokenizer=tiny_tokenizer(TINY_CORPUS, 300))
    Engine(other_model, other, encode_cache=cache).teacher_forced(samples, 2)
    assert len(cache.store) == 6                                          # its own entries, none reused
    assert len(EncodeCache(max_bytes=1).store) == 0
