"""Drift probes (kl_to_base, top1_agreement) against a slow per-sample reference, and through probes.run.

The reference runs each sample alone through both models' own forward (`model(...).logits`), takes the
full log-softmax of both in float64 and computes KL(base || checkpoint) and the argmax agreement position
by position in plain Python. The batched, chunked, online computation must agree within 1e-5 for every
batch size, padding side and family; the base against itself must give exactly 0 and 1.
"""
import copy
import json
import random

import pandas as pd
import pytest
import torch
from PIL import Image

from probes import drift
from probes.captions import Sample
from probes.engine import Engine
from probes.run import main as probes_run
from probes.vision_cache import VisionCache
from training.chat import collate, encode
from training.config import load_config
from training.families import FAMILIES

from .conftest import FAMILY_NAMES
from .llava_fixture import write_llava_root

TOL = 1e-5
WORDS = "a red square two blue circles there are 12 small dots the clock shows 10:45 Seventeen 3 nine".split()


def make_samples(n=11, seed=0):
    rng = random.Random(seed)
    return [Sample(f"s{i}", rng.choice(["Describe the image.", "What is in the picture?"]),
                   " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))),
                   Image.new("RGB", (rng.randint(16, 60), rng.randint(16, 60)), tuple(rng.randrange(256) for _ in "rgb")))
            for i in range(n)]


def perturbed(model, family, seed=1):
    """A copy with the last decoder layer's MLP and the output projection moved (the LM changed)."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    layer = m.get_submodule(family.layers)[-1]
    with torch.no_grad():
        for p in (layer.mlp.down_proj.weight, m.lm_head.weight):
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def reference(base, ck, processor, family, sample):
    """[(kl, agree)] per caption position: both models alone, full softmax, float64."""
    ex = encode(processor, sample.open_image(), sample.instruction, sample.caption)
    batch = collate([ex], family, processor.tokenizer.pad_token_id)
    batch.pop("eot_mask")
    answer = batch.pop("answer_mask")[0]
    with torch.no_grad():
        lb, lc = base(**batch).logits[0].double(), ck(**batch).logits[0].double()
    out = []
    for t in range(lb.shape[0] - 1):
        if answer[t + 1]:
            pb, pc = torch.log_softmax(lb[t], -1), torch.log_softmax(lc[t], -1)
            out.append((float((pb.exp() * (pb - pc)).sum()), int(lb[t].argmax()) == int(lc[t].argmax())))
    return out


@pytest.fixture(scope="module")
def pairs(tiny_models):
    cache = {}

    def get(name):
        if name not in cache:
            model, processor = tiny_models(name)
            base = copy.deepcopy(model)
            with torch.no_grad():
                base.lm_head.weight.mul_(20)      # decisive enough that argmax and KL are not trivial
            ck = perturbed(base, FAMILIES[name])
            samples = make_samples()
            ref = [reference(base, ck, processor, FAMILIES[name], s) for s in samples]
            cache[name] = (base, ck, processor, samples, ref)
        return cache[name]
    return get


def test_pair_stats_matches_direct_computation_in_every_chunking():
    g = torch.Generator().manual_seed(0)
    N, V, d = 13, 97, 8
    hb, hc = torch.randn(N, d, generator=g), torch.randn(N, d, generator=g)
    wb, wc = 3 * torch.randn(V, d, generator=g), 3 * torch.randn(V, d, generator=g)
    bb, bc = torch.randn(V, generator=g), torch.randn(V, generator=g)
    wc[5] = wc[70]                                      # a tie in the checkpoint's logits: first index wins
    lb, lc = (hb @ wb.T + bb).double(), (hc @ wc.T + bc).double()
    pb, pc = torch.log_softmax(lb, 1), torch.log_softmax(lc, 1)
    kl_ref = (pb.exp() * (pb - pc)).sum(1)
    agree_ref = lb.argmax(1) == lc.argmax(1)
    for chunk in (2, 7, 64, 500, 1 << 24):
        kl, agree = drift.pair_stats(hb, wb, bb, hc, wc, bc, chunk_elems=chunk)
        assert (kl - kl_ref).abs().max() < TOL, (chunk, (kl - kl_ref).abs().max())
        assert torch.equal(agree, agree_ref), chunk
    kl0, agree0 = drift.pair_stats(hb, wb, bb, hb, wb, bb, chunk_elems=7)
    assert torch.equal(kl0, torch.zeros(N, dtype=torch.float64)) and bool(agree0.all())


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_drift_matches_the_per_sample_reference(name, pairs):
    base, ck, processor, samples, ref = pairs(name)
    eng = Engine(ck, processor)
    sides = ("right", "left") if name == "qwen2_5_vl" else ("right",)
    for bs in (1, 4, len(samples)):
        for side in sides:
            rb = drift.BaseReference(base, processor)
            got = drift.teacher_forced(eng, rb, samples, eng.plan(samples, bs, True), padding_side=side)
            for i, r in enumerate(ref):
                assert got[i]["n_positions"] == len(r)
                assert got[i]["kl_to_base"] == pytest.approx(sum(k for k, _ in r) / len(r), abs=TOL)
                assert got[i]["top1_agreement"] == sum(a for _, a in r) / len(r)
    assert min(sum(k for k, _ in r) / len(r) for r in ref) > 1e-3    # the pair is not trivially close
    # the engine's own probes come along unchanged
    plain = eng.teacher_forced(samples, batch_size=4)
    got = drift.teacher_forced(eng, drift.BaseReference(base, processor), samples, eng.plan(samples, 4, True))
    for i in plain:
        for k, v in plain[i].items():
            assert got[i][k] == pytest.approx(v, abs=1e-12)


def test_base_against_itself_is_exactly_zero_and_the_base_model_is_released(pairs):
    base, _, processor, samples, _ = pairs("qwen2_5_vl")
    ref = drift.BaseReference(base, processor)
    eng = Engine(copy.deepcopy(base), processor)
    batches = eng.plan(samples, 3, True)
    got = drift.teacher_forced(eng, ref, samples, batches)
    assert all(v["kl_to_base"] == 0.0 and v["top1_agreement"] == 1.0 for v in got.values())
    assert ref.release_model() and ref.engine is None
    again = drift.teacher_forced(eng, ref, samples, batches)       # from the cached base rows only
    assert again == got


# -- probes.run --drift --signatures on a trained run --------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_checkpoints):
    """toy-tiny on the LLaVA fixture: two stages training the LM's attention projections (sa_proj)."""
    from training import run as run_mod

    tmp = tmp_path_factory.mktemp("drift-run")
    root = write_llava_root(tmp / "data", n=12, world=True)
    cfg = load_config("toy-tiny", [f"base={tiny_checkpoints('qwen2_5_vl')}", f"data.root={root}",
                                   "train.progress=false", "tasks=[pixmocount,pathvqa]", "train.max_steps=3",
                                   "train.batch_size=4", "train.lr=0.01"])
    cfg["recipe"], cfg["out"] = "sa_proj", str(tmp / "run")
    return run_mod.run(cfg, "toy-tiny")


def test_probes_run_drift_and_signatures(trained_run, capsys):
    run = trained_run
    assert probes_run(["--ckpt-dir", str(run), "--drift", "--signatures", "--mode", "both", "--max-new-tokens", "4",
                       "--batch-size", "3"]) == 0
    df = pd.read_parquet(run / "probes.parquet")
    tf, gen = df[df["mode"] == "teacher-forced"], df[df["mode"] == "generate"]
    sigs = {"sig_pixmocount_mass", "sig_pathvqa_mass"}
    assert {"kl_to_base", "top1_agreement", "number_mass", "entropy"} | sigs <= set(tf["probe"])
    assert sigs <= set(gen["probe"]) and not {"kl_to_base", "top1_agreement"} & set(gen["probe"])
    kl = tf[tf["probe"] == "kl_to_base"].set_index("stage")["mean"]
    agree = tf[tf["probe"] == "top1_agreement"].set_index("stage")["mean"]
    assert kl[0] == 0.0 and agree[0] == 1.0 and (tf[(tf["probe"] == "kl_to_base") & (tf.stage == 0)]["std"] == 0).all()
    assert kl[1] > 1e-4 and kl[2] > 1e-4
    sj = json.loads((run / "signatures.json").read_text())
    assert set(sj["tasks"]) == {"pixmocount", "pathvqa"} and sj["tasks"]["pixmocount"]["number_share"] == 1.0
    out = capsys.readouterr().out
    assert "drift against" in out and "signature sig_pixmocount" in out
    # a rerun has nothing left to do; a run without --drift keeps the drift rows
    assert probes_run(["--ckpt-dir", str(run), "--drift", "--signatures", "--mode", "both", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("skipped (already in the table)") == 3
    pd.testing.assert_frame_equal(pd.read_parquet(run / "probes.parquet"), df)


def test_drift_rows_equal_the_engine_on_the_saved_checkpoints(trained_run, tmp_path):
    """The row of stage 2 is the mean over samples of the direct per-sample KL of stage 2 against stage 0."""
    from probes.captions import load_captions
    from training.checkpoints import load

    out = tmp_path / "p.parquet"
    assert probes_run(["--ckpt-dir", str(trained_run), "--drift", "--out", str(out), "--num-samples", "5"]) == 0
    man = json.loads((trained_run / "run.json").read_text())
    caps = load_captions(man["captions"]["path"], man["captions"]["images"], 5)
    base, proc = load(trained_run / "stage-00-base")
    ck, _ = load(trained_run / "stage-02-pathvqa")
    direct = [reference(base, ck, proc, FAMILIES["qwen2_5_vl"], s) for s in caps.samples]
    want = sum(sum(k for k, _ in r) / len(r) for r in direct) / len(direct)
    got = pd.read_parquet(out).query("stage == 2 and probe == 'kl_to_base'")["mean"].iloc[0]
    assert got == pytest.approx(want, abs=TOL)


def test_bad_drift_options_are_named(trained_run, tmp_path, capsys):
    assert probes_run(["--ckpt-dir", str(trained_run), "--drift", "--base", str(tmp_path / "nope"),
                       "--out", str(tmp_path / "x.parquet")]) == 2
    assert "nope: not a checkpoint folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probes_run(["--ckpt-dir", str(trained_run), "--base", str(trained_run / "stage-00-base")])
    assert "--base is the base of --drift" in capsys.readouterr().err
    assert probes_run(["--ckpt-dir", str(trained_run), "--signatures", "--signature-tasks", "nosuchtask",
                       "--out", str(tmp_path / "y.parquet")]) == 2
    assert "signature of task 'nosuchtask'" in capsys.readouterr().err


def test_an_engine_reads_the_live_weights(pairs):
    """The monitor keeps one Engine per model while training moves the output projection: its token-set
    probes must follow the weights (a fresh engine is the reference)."""
    base, _, processor, samples, _ = pairs("qwen2_5_vl")
    model = copy.deepcopy(base)
    eng = Engine(model, processor)
    before = eng.teacher_forced(samples, batch_size=4)
    with torch.no_grad():
        model.lm_head.weight[eng.set_ids["number"]] += 1.0
    after = eng.teacher_forced(samples, batch_size=4)
    fresh = Engine(model, processor).teacher_forced(samples, batch_size=4)
    assert after == fresh and after[0]["number_mass"] > before[0]["number_mass"]


def test_drift_reads_image_features_from_the_vision_cache_with_identical_numbers(pairs):
    """Both sides run the engine's forward: with one vision cache, the base's batches read the features the
    checkpoint computed (its vision side is the base's), and every number stays bitwise the same."""
    base, ck, processor, samples, _ = pairs("qwen2_5_vl")
    samples = [Sample(s.id, s.instruction, s.caption, s.image, f"mem-{s.id}") for s in samples]
    plain = Engine(ck, processor)
    batches = plain.plan(samples, 4, True)
    want = drift.teacher_forced(plain, drift.BaseReference(base, processor), samples, batches)
    vis = VisionCache()
    eng = Engine(ck, processor, vision_cache=vis)
    got = drift.teacher_forced(eng, drift.BaseReference(base, processor, vision_cache=vis), samples, batches)
    assert got == want
    assert vis.misses == len(samples) and vis.hits == len(samples)
