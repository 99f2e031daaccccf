"""Per-layer write-back attribution: against a slow per-sample reference over the full vocabulary, exact zeros
where nothing changed, and `python -m probes.layers` on a trained run."""
import copy
import random

import pandas as pd
import pytest
import torch
from PIL import Image

from probes import layers
from probes.captions import Sample
from probes.engine import Engine
from probes.schemas import LAYERS
from probes.tokensets import token_set
from probes.vision_cache import VisionCache
from training.chat import collate, encode
from training.config import load_config
from training.families import FAMILIES

from .llava_fixture import write_llava_root

FAM = FAMILIES["qwen2_5_vl"]
WORDS = "a red square two blue circles there are 12 small dots the clock shows 10:45 3 nine".split()


def make_samples(n=7, seed=0):
    rng = random.Random(seed)
    return [Sample(f"s{i}", "Describe the image.", " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9))),
                   Image.new("RGB", (32, 32), tuple(rng.randrange(256) for _ in "rgb"))) for i in range(n)]


@pytest.fixture(scope="module")
def three_layers():
    model, processor = FAM.build_tiny(seed=0, layers=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model, processor


def changed(model, layer=1):
    """Only layers[layer].self_attn.o_proj moves."""
    m = copy.deepcopy(model)
    w = m.get_submodule(FAM.layers)[layer].self_attn.o_proj.weight
    with torch.no_grad():
        w.add_(0.5 * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    return m


def reference(base, ck, processor, sample, num_ids):
    """{hook|measure: per-sample mean} from full outputs, full-vocabulary logits, float64, one sample alone."""
    ex = encode(processor, sample.open_image(), sample.instruction, sample.caption)
    batch = collate([ex], FAM, processor.tokenizer.pad_token_id)
    batch.pop("eot_mask")
    answer = batch.pop("answer_mask")[0]

    def run(model):
        outs, hooks = {}, []
        for i, layer in enumerate(model.get_submodule(FAM.layers)):
            for c, mod in (("attn", layer.self_attn), ("mlp", layer.mlp)):
                hooks.append(mod.register_forward_hook(
                    lambda m, a, o, k=f"blocks.{i}.{c}_out": outs.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[0])))
        hooks.append(model.get_submodule(FAM.final_norm).register_forward_hook(
            lambda m, a, o: outs.__setitem__("x_final", a[0][0])))
        with torch.no_grad():
            logits = model(**batch).logits[0].double()
        for h in hooks:
            h.remove()
        return outs, logits

    ob, zb = run(base)
    oc, _ = run(ck)
    norm = base.get_submodule(FAM.final_norm)
    W = base.lm_head.weight.detach().double()
    acc, n = {}, 0
    for t in range(zb.shape[0] - 1):
        if not answer[t + 1]:
            continue
        n += 1
        x = ob["x_final"][t].double()
        s = 1 / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
        p, q = torch.softmax(zb[t], 0), torch.softmax(zb[t][num_ids], 0)
        for k in ob:
            if k == "x_final":
                continue
            D = (oc[k][t] - ob[k][t]).double()
            dL = W @ (norm.weight.detach().double() * D * s)
            vals = {"logit_l2": (dL - dL.mean()).norm(), "number_logit": dL[num_ids].mean() - dL.mean(),
                    "number_logmass": (q * dL[num_ids]).sum() - (p * dL).sum(), "resid_l2": D.norm()}
            for m, v in vals.items():
                acc[f"{k}|{m}"] = acc.get(f"{k}|{m}", 0.0) + float(v)
    return {k: v / n for k, v in acc.items()}, n


def test_attribution_matches_the_full_vocabulary_reference(three_layers):
    base, processor = three_layers
    ck = changed(base, layer=1)
    num = token_set(processor.tokenizer, "number")
    samples = make_samples()
    be, ce = Engine(base, processor, token_sets=()), Engine(ck, processor, token_sets=())
    for bs, chunk in ((1, 1 << 24), (3, 97), (7, 1000)):      # small chunks: many vocabulary blocks
        got = layers.attribute(be, ce, layers.Readout(base, num, chunk_elems=chunk), samples,
                               be.plan(samples, bs, True))
        for i, s in enumerate(samples):
            want, n = reference(base, ck, processor, s, num)
            assert got[i]["n_positions"] == n
            for k, v in want.items():
                # batch size 1: the same forward as the reference, so only the algebra differs; in a batch the
                # fp32 forward itself differs in the last bits, which a difference of outputs magnifies
                tol = dict(rel=1e-7, abs=1e-12) if bs == 1 else dict(rel=1e-4, abs=1e-6)
                assert got[i][k] == pytest.approx(v, **tol), (bs, i, k)
    assert want["blocks.1.attn_out|logit_l2"] > 0.01


def test_unchanged_layers_are_exactly_zero(three_layers):
    base, processor = three_layers
    num = token_set(processor.tokenizer, "number")
    samples = make_samples()
    be = Engine(base, processor, token_sets=())
    readout = layers.Readout(base, num)
    same = layers.attribute(be, Engine(copy.deepcopy(base), processor, token_sets=()), readout, samples,
                            be.plan(samples, 4, True))
    assert all(v == 0.0 for r in same.values() for k, v in r.items() if k != "n_positions")
    got = layers.attribute(be, Engine(changed(base, layer=1), processor, token_sets=()), readout, samples,
                           be.plan(samples, 4, True))
    for r in got.values():
        assert all(r[f"blocks.0.{c}_out|{m}"] == 0.0 for c in ("attn", "mlp") for m in layers.MEASURES)
        assert r["blocks.1.attn_out|resid_l2"] > 0 and r["blocks.1.attn_out|logit_l2"] > 0
        assert r["blocks.1.mlp_out|resid_l2"] > 0       # its weights are the base's, its input is not


def test_probes_layers_cli_on_a_trained_run(tmp_path, capsys):
    from training import run as run_mod

    base = FAM.save_tiny(tmp_path / "base", seed=0, layers=3)
    root = write_llava_root(tmp_path / "data", n=8, world=True)
    cfg = load_config("toy-tiny", [f"base={base}", f"data.root={root}", "train.progress=false",
                                   "tasks=[pixmocount]", "train.max_steps=2", "train.batch_size=4", "train.lr=0.01"])
    cfg["recipe"], cfg["out"] = "layers[2:].attn", str(tmp_path / "run")
    run = run_mod.run(cfg, "toy-tiny")
    assert layers.main(["--ckpt-dir", str(run), "--num-samples", "5", "--batch-size", "2"]) == 0
    df = pd.read_parquet(run / "layers.parquet")
    assert list(df.columns) == list(LAYERS.columns)
    assert len(df) == 2 * 3 * 2 * len(layers.MEASURES) and not df.duplicated(list(LAYERS.key)).any()
    assert set(df["hook"]) == {f"blocks.{i}.{c}_out" for i in range(3) for c in ("attn", "mlp")}
    assert (df.loc[df.stage == 0, ["mean", "std"]] == 0).all().all()            # the base against itself
    s1 = df[df.stage == 1]
    assert (s1.loc[s1.layer < 2, "mean"] == 0).all()                              # before the first changed layer
    l2 = s1[(s1.layer == 2) & (s1.measure == "logit_l2")].set_index("component")["mean"]
    assert l2["attn"] > 0 and l2["mlp"] > 0
    assert (df["base"] == "stage-00-base").all() and (df["n_samples"] == 5).all()
    out = capsys.readouterr().out
    assert "logit_l2" in out and out.count("done") == 2
    assert layers.main(["--ckpt-dir", str(run), "--num-samples", "5"]) == 0
    assert capsys.readouterr().out.count("skipped (already in the table)") == 2
    assert layers.main(["--ckpt-dir", str(run), "--num-samples", "4"]) == 1           # other captions: stop
    assert "use --out or --replace" in capsys.readouterr().err


def test_attribution_reads_image_features_from_the_vision_cache(three_layers, monkeypatch):
    """The layers run the engine's forward: with a vision cache the checkpoint reads the base's image
    features, the numbers stay bitwise the same, and the taps fire once per forward even in the forward
    that first checks the embeddings path (the hooks are entered around the model's own pass only)."""
    import probes.forward as forward_mod

    monkeypatch.setattr(forward_mod, "_EMBEDS_PATH_OK", {})
    base, processor = three_layers
    ck = changed(base, layer=1)
    readout = layers.Readout(base, token_set(processor.tokenizer, "number"))
    samples = [Sample(s.id, s.instruction, s.caption, s.image, f"mem-{s.id}") for s in make_samples()]
    plain = Engine(base, processor, token_sets=())
    batches = plain.plan(samples, 4, True)
    want = layers.attribute(plain, Engine(ck, processor, token_sets=()), readout, samples, batches)
    vis = VisionCache()
    got = layers.attribute(Engine(base, processor, token_sets=(), vision_cache=vis),
                           Engine(ck, processor, token_sets=(), vision_cache=vis), readout, samples, batches)
    assert got == want
    assert vis.misses == len(samples) and vis.hits == len(samples)
