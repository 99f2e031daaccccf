"""The probe engine on every kind of model in the tiny zoo (training/families/zoo.py): teacher-forced statistics
against the slow per-sample fp64 reference of tests/test_probe_engine.py, batched with padding and through the
encode and vision caches (or with the vision cache turned off, where a family's image path is not the
embeddings scatter); greedy generation against the uncached per-sample reference on a few kinds. Text-only
LMs probe the caption text alone (no image)."""
import warnings

import pytest
import torch
from PIL import Image

from probes.batching import EncodeCache
from probes.captions import Sample
from probes.engine import Engine
from probes.forward import caption_positions
from probes.layers import Taps
from probes.vision_cache import VisionCache
from training.families import family_of_model, zoo

from .test_probe_engine import make_samples, ref_generate, ref_teacher_forced

ZOO = [n for n in zoo.TINY if zoo.available(n)]
REL = 1e-4                     # relative to the reference value (NOTES_ON_ISSUES: "Any Hugging Face model")
GEN_KINDS = ["qwen3_5", "mllama", "gemma3", "qwen3_vl_moe", "mistral3", "phi3"]
MAX_NEW = 5


SIZES = [(48, 32), (32, 64), (80, 40), (40, 40), (64, 48)]   # aspect ratios every tiny vision tower accepts


def zoo_samples(name: str) -> list[Sample]:
    """Captions of test_probe_engine's samples, with images of several sizes; none for a text-only LM (the
    instruction and the caption alone)."""
    with_image = bool(zoo.TINY[name].placeholder)
    return [Sample(s.id, s.instruction, s.caption, Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)) if with_image
                   else None, s.image_ref if with_image else None)
            for i, (s, size) in enumerate(zip(make_samples(len(SIZES), seed=1), SIZES))]


@pytest.fixture(scope="module")
def zoo_setup():
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = zoo.build(name)
            samples = zoo_samples(name)
            ids = Engine(model, processor).set_ids["number"]
            ref = [ref_teacher_forced(model, processor, family_of_model(model), s, ids) for s in samples]
            cache[name] = (model, processor, samples, ref)
        return cache[name]
    return get


def close(got: float, ref: float) -> bool:
    return abs(got - ref) <= REL * abs(ref)


@pytest.mark.parametrize("name", ZOO)
def test_teacher_forced_matches_fp64_reference_on_every_zoo_model(name, zoo_setup):
    model, processor, samples, ref = zoo_setup(name)
    enc, vis = EncodeCache(), VisionCache()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the vision cache says when it turns itself off for a family
        for side in ("right", "left"):    # the second pass reads encodings (and image features) from the caches
            eng = Engine(model, processor, encode_cache=enc, vision_cache=vis, chunk_elems=500)
            got = eng.teacher_forced(samples, batch_size=3, padding_side=side)
            for i, r in enumerate(ref):
                assert got[i]["n_positions"] == r["n_positions"], (name, side, i)
                for k in ("number_mass", "number_max_prob", "entropy"):
                    assert close(got[i][k], r[k]), (name, side, i, k, got[i][k], r[k])
    if not zoo.TINY[name].placeholder:
        assert vis.misses == vis.hits == 0 and not any(eng.encode(s, True).image_inputs for s in samples)


@pytest.mark.parametrize("name", GEN_KINDS)
def test_generation_matches_per_sample_greedy_reference(name, zoo_setup):
    model, processor, samples, _ = zoo_setup(name)
    eng = Engine(model, processor)
    ids = eng.set_ids["number"]
    fam = family_of_model(model)
    gens = eng.generate(samples, batch_size=3, max_new_tokens=MAX_NEW, stats=True, padding_side="left")
    for g, s in zip(gens, samples):
        tokens, r = ref_generate(model, processor, fam, s, ids, eng.stop_ids, MAX_NEW)
        assert g.token_ids == tokens, (name, s.id)
        assert close(g.stats["number_mass"], r["number_mass"]), (name, s.id, g.stats, r)


@pytest.mark.parametrize("name", ZOO)
def test_layer_writes_sum_to_the_final_residual(name, zoo_setup):
    """probes.layers' write points are what each block adds to the residual stream: at the caption positions
    the token embeddings plus every block's write equal the final norm's input (cross-attention gates, sandwich
    norms and MoE blocks included); the blocks are reported by kind."""
    model, processor, samples, _ = zoo_setup(name)
    eng = Engine(model, processor, token_sets=())
    taps = Taps(model, eng.family)
    idx, batch, keys = next(eng.stream(samples, [[0, 1]], True, "right"))
    eng.forward.caption_rows(samples, idx, batch, keys, hooks=taps.capture)
    rows = dict(taps.rows)
    emb = model.get_input_embeddings()(batch["input_ids"])[caption_positions(batch["answer_mask"])]
    total = emb.float() + sum(v for k, v in rows.items() if k.startswith("blocks."))
    torch.testing.assert_close(total, rows["ln_final.input"], rtol=1e-4, atol=1e-4)
    kinds = {k.split(".")[2].removesuffix("_out") for k in rows if k.startswith("blocks.")}
    assert kinds == {"qwen3_5": {"attn", "linear_attn", "mlp"}, "mllama": {"attn", "xattn", "mlp"}}.get(
        name, {"attn", "mlp"}), kinds
