"""The GPU-side speed paths: worker processes into pinned memory, the vision cache on the device, bf16, and
regional torch.compile, against the per-sample references. Skipped without a CUDA device, except the
compile check, which also runs on a CPU with PROBES_TEST_COMPILE=1 (about 2.5 minutes: inductor compiles)."""
import copy
import os

import pytest
import torch

from probes.batching import EncodeCache
from probes.bench import main as bench_main
from probes.engine import Engine
from probes.vision_cache import VisionCache

from .test_probe_engine import MAX_NEW, max_diff, setup  # noqa: F401  (setup is a fixture)

CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_next"])
def test_gpu_workers_pinned_memory_and_vision_cache_match_the_reference(name, setup):  # noqa: F811
    samples, model, processor, tf_ref, gen_ref = setup(name)
    gpu = copy.deepcopy(model).to("cuda")
    enc, vis = EncodeCache(), VisionCache()
    for _ in range(2):                              # the second engine reads features and encodings back
        eng = Engine(gpu, processor, encode_cache=enc, vision_cache=vis, workers=2)
        assert eng.inputs.workers == 2 and eng.inputs.prefetch == 2
        got = eng.teacher_forced(samples, 8)
        assert max(max_diff(got[i], r) for i, r in enumerate(tf_ref)) < 1e-5
        gens = eng.generate(samples, 8, max_new_tokens=MAX_NEW, stats=True)
        assert [g.token_ids for g in gens] == [t for t, _ in gen_ref]
    assert vis.hits == 2 * len(samples)


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA or os.environ.get("PROBES_TEST_COMPILE") == "1"),
                    reason="needs a CUDA device (or PROBES_TEST_COMPILE=1 to compile on the CPU)")
def test_compiled_decoder_layers_match_the_reference(setup):  # noqa: F811
    samples, model, processor, tf_ref, gen_ref = setup("qwen2_5_vl")
    m = copy.deepcopy(model).to("cuda" if CUDA else "cpu")
    eng = Engine(m, processor, compile=True)
    got = eng.teacher_forced(samples, 16)
    assert max(max_diff(got[i], r) for i, r in enumerate(tf_ref)) < 1e-4
    gens = eng.generate(samples[:8], 8, max_new_tokens=5, stats=True)
    assert [g.token_ids for g in gens] == [t[:5] for t, _ in gen_ref[:8]]


@pytest.mark.gpu
@needs_gpu
def test_bench_on_the_gpu_reports_model_flop_utilisation(capsys):
    assert bench_main(["--quick", "--device", "cuda", "--num-captions", "8", "--study-captions", "2",
                       "--max-new-tokens", "4", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "CUDA allocator peak" in out
    assert out.strip().splitlines()[-1].startswith("speedup generation engine vs study probe: ")
