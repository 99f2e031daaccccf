"""The vision-embedding cache: exact reuse across checkpoints whose vision side is bitwise equal, none
after a vision or projector change; preprocessing in worker processes; bounded logits blocks."""
import copy

import pytest
import torch

import probes.batching as batching_mod
import probes.forward as forward_mod
from probes.batching import EncodeCache
from probes.bench import perturb_lm_attention
from probes.captions import Sample
from probes.engine import Engine
from probes.vision_cache import VisionCache, vision_fingerprint
from training.families import FAMILIES

from .conftest import FAMILY_NAMES
from .test_probe_engine import BlockSizes, make_samples

N = 12



def changed(model, name, part: str):
    """A copy of the model with one tensor of `part` (lm attention, vision encoder or projector) changed."""
    m = copy.deepcopy(model)
    fam = FAMILIES[name]
    if part == "lm":
        perturb_lm_attention(m, fam)
        return m
    prefix = fam.vision if part == "vision" else fam.projector[0]
    skip = tuple(p + "." for p in fam.projector) if part == "vision" else ()
    with torch.no_grad():
        p = next(t for n, t in m.named_parameters() if n.startswith(prefix + ".") and not n.startswith(skip))
        p.add_(0.01)
    return m


def max_diff(a: dict, b: dict) -> float:
    return max(abs(a[i][k] - b[i][k]) for i in b for k in ("number_mass", "number_max_prob", "entropy"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_lm_only_checkpoint_reuses_features_exactly(name, tiny_models):
    model, processor = tiny_models(name)
    samples = make_samples(N, seed=3)
    enc, vis = EncodeCache(), VisionCache()
    first = Engine(model, processor, encode_cache=enc, vision_cache=vis)
    first.teacher_forced(samples, 5)
    first.generate(samples, 5, max_new_tokens=6, stats=True)
    assert (vis.hits, vis.misses, len(vis.store)) == (0, 2 * N, 2 * 3)      # 3 batches per mode
    second = changed(model, name, "lm")
    got = Engine(second, processor, encode_cache=enc, vision_cache=vis).teacher_forced(samples, 5)
    assert vis.hits == N and vis.misses == 2 * N
    want = Engine(second, processor).teacher_forced(samples, 5)
    assert max_diff(got, want) == 0.0        # the features of the same batches: bitwise the same numbers
    gens = Engine(second, processor, vision_cache=vis).generate(samples, 5, max_new_tokens=6, stats=True)
    ref = Engine(second, processor).generate(samples, 5, max_new_tokens=6, stats=True)
    assert vis.hits == 2 * N
    assert [(g.token_ids, g.stats) for g in gens] == [(g.token_ids, g.stats) for g in ref]


@pytest.mark.parametrize("part", ["vision", "projector"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_vision_or_projector_change_is_not_reused(name, part, tiny_models):
    model, processor = tiny_models(name)
    samples = make_samples(N, seed=4)
    vis = VisionCache()
    Engine(model, processor, vision_cache=vis).teacher_forced(samples, 6)
    second = changed(model, name, part)
    assert vision_fingerprint(second, FAMILIES[name]) != vision_fingerprint(model, FAMILIES[name])
    got = Engine(second, processor, vision_cache=vis).teacher_forced(samples, 6)
    assert vis.hits == 0 and len(vis.store) == 2 * 2          # two batches under each fingerprint
    assert max_diff(got, Engine(second, processor).teacher_forced(samples, 6)) == 0.0


def test_fingerprint_follows_the_vision_side_only(tiny_models):
    model, _ = tiny_models("qwen2_5_vl")
    fam = FAMILIES["qwen2_5_vl"]
    fp = vision_fingerprint(model, fam)
    assert vision_fingerprint(copy.deepcopy(model), fam) == fp
    assert vision_fingerprint(changed(model, "qwen2_5_vl", "lm"), fam) == fp
    assert vision_fingerprint(copy.deepcopy(model).to(torch.float64), fam) != fp


def test_without_a_stable_image_identity_nothing_is_stored(tiny_models):
    model, processor = tiny_models("llava_onevision")
    samples = [Sample(s.id, s.instruction, s.caption, s.image) for s in make_samples(6)]   # no image_ref
    vis = VisionCache()
    got = Engine(model, processor, vision_cache=vis).teacher_forced(samples, 4)
    assert not vis.store and max_diff(got, Engine(model, processor).teacher_forced(samples, 4)) == 0.0
    tiny = VisionCache(max_bytes=1)                                                       # over budget
    Engine(model, processor, vision_cache=tiny).teacher_forced(make_samples(6), 4)
    assert not tiny.store


def test_a_transformers_version_whose_features_differ_turns_the_cache_off(tiny_models, monkeypatch):
    """The embeddings path is checked once against the model's own forward; on a mismatch the engine
    warns and runs the model's own path, so the numbers stay right."""
    model, processor = tiny_models("qwen2_5_vl")
    model = copy.deepcopy(model)
    samples = make_samples(N, seed=5)
    want = Engine(model, processor).teacher_forced(samples, 6)
    monkeypatch.setattr(forward_mod, "_EMBEDS_PATH_OK", {})
    real = forward_mod.Forward._image_features
    monkeypatch.setattr(forward_mod.Forward, "_image_features", lambda *a, **k: real(*a, **k) * 1.5)   # not the forward's
    eng = Engine(model, processor, vision_cache=VisionCache())
    with pytest.warns(UserWarning, match="vision cache is off"):
        got = eng.teacher_forced(samples, 6)
    assert eng.forward.vision_fp is None and max_diff(got, want) < 1e-6


def test_worker_processes_and_prefetch_thread_give_the_same_numbers(tiny_models):
    model, processor = tiny_models("llava_next")
    samples = make_samples(N, seed=6)
    want = Engine(model, processor, prefetch=0, workers=0).teacher_forced(samples, 4)
    for kw in (dict(workers=2), dict(workers=0, prefetch=2)):
        assert max_diff(Engine(model, processor, **kw).teacher_forced(samples, 4), want) == 0.0
    gens = Engine(model, processor, workers=2).generate(samples, 4, max_new_tokens=4, stats=True)
    ref = Engine(model, processor, workers=0).generate(samples, 4, max_new_tokens=4, stats=True)
    assert [(g.index, g.token_ids, g.stats) for g in gens] == [(g.index, g.token_ids, g.stats) for g in ref]


def test_no_logits_block_grows_with_positions_or_captions(tiny_models):
    """Whatever the number of captions, the model's own lm_head never runs and every logits block the
    engine makes holds at most chunk_elems values: peak logits memory is bounded by the chunk."""
    model, processor = tiny_models("qwen2_5_vl")
    head_calls, blocks = [], BlockSizes()
    hook = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    chunk = 4096
    try:
        largest = []
        for n in (8, 32):
            blocks.sizes.clear()
            eng = Engine(model, processor, chunk_elems=chunk, counter=blocks)
            eng.teacher_forced(make_samples(n, seed=7), 32)
            eng.generate(make_samples(n, seed=7), 32, max_new_tokens=3, stats=True)
            largest.append(max(blocks.sizes))
    finally:
        hook.remove()
    assert not head_calls
    assert max(largest) <= chunk and largest[0] == largest[1]


def test_probe_run_reuses_features_across_lm_only_stages_with_an_identical_table(tmp_path, monkeypatch):
    """`probes.run` over a run whose stages change only the LM: stages 1 and 2 read every image's features
    from the cache, and the table equals the one computed with --no-vision-cache."""
    import json

    import pandas as pd

    import probes.run as run_mod
    from training.checkpoints import save_full

    from .test_probe_run import write_captions

    model, processor = FAMILIES["qwen2_5_vl"].build_tiny(seed=0)
    write_captions(tmp_path)
    run, stages = tmp_path / "run", []
    for s in range(3):
        if s:
            perturb_lm_attention(model, FAMILIES["qwen2_5_vl"], seed=s)
        save_full(model, processor, run / f"stage-{s:02d}")
        stages.append({"index": s, "name": f"s{s}", "task": None, "path": f"stage-{s:02d}"})
    (run / "run.json").write_text(json.dumps({
        "family": "qwen2_5_vl", "recipe": "sa_proj", "base": "tiny", "tasks": [], "config": {}, "stages": stages,
        "captions": {"path": str(tmp_path / "caps.json"), "images": str(tmp_path / "imgs")}}))
    made = []

    class Recording(VisionCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(run_mod, "VisionCache", Recording)
    common = ["--ckpt-dir", str(run), "--mode", "both", "--max-new-tokens", "4", "--batch-size", "4"]
    assert run_mod.main(common + ["--out", str(tmp_path / "cached.parquet")]) == 0
    # computed by stage 0 (each mode's plan), read by both modes of stages 1 and 2
    assert made[0].misses == 2 * 9 and made[0].hits == 2 * 2 * 9
    assert run_mod.main(common + ["--out", str(tmp_path / "plain.parquet"), "--no-vision-cache"]) == 0
    assert len(made) == 1
    a, b = pd.read_parquet(tmp_path / "cached.parquet"), pd.read_parquet(tmp_path / "plain.parquet")
    assert len(a) == 3 * 3 * 2
    pd.testing.assert_frame_equal(a, b)


def test_checkpoints_sharing_an_encode_cache_share_the_plan(tiny_models, monkeypatch):
    model, processor = tiny_models("qwen2_5_vl")
    samples, enc = make_samples(N, seed=8), EncodeCache()
    first = Engine(model, processor, encode_cache=enc).plan(samples, 5, True)
    monkeypatch.setattr(batching_mod, "estimate_lengths", lambda *a: pytest.fail("planned twice"))
    assert Engine(model, processor, encode_cache=enc).plan(samples, 5, True) == first
    with pytest.raises(pytest.fail.Exception):                 # another batch size is another plan
        Engine(model, processor, encode_cache=enc).plan(samples, 4, True)
