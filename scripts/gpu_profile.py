"""Where the engines' time goes, as JSON: one teacher-forced pass and one short generation over the same
captions, each under torch.profiler (device busy time against wall time, the top kernels and operators)
and then under cProfile (the top Python functions by cumulative time: preprocessing, waiting for the
loader, the forward, the vocabulary statistics).

    python3 scripts/gpu_profile.py --shape qwen2_5_vl_7b --captions 64 --json prof.json     # a GPU
    python3 scripts/gpu_profile.py --quick --family qwen2_5_vl --captions 8 --json prof.json  # a CPU

The model, captions and engine settings are probes.bench's (random weights at a shipped shape's real
dimensions, synthetic JPEGs); scripts/gpu_check.py runs this after the goal shape's bench.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the toolkit's packages live at the repository root

TOP = 15


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu_profile.py", description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", help="a shipped 7-8B shape (GPU)")
    src.add_argument("--quick", action="store_true", help="the family's tiny model on a CPU")
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--captions", type=int, default=64)
    ap.add_argument("--batch-size", type=int, help="engine batch size (default: the bench's)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generation length (default 32)")
    ap.add_argument("--json", required=True, metavar="PATH")
    return ap.parse_args(argv)


def timed(fn, cuda: bool) -> float:
    import torch

    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def torch_profile(fn, cuda: bool) -> dict:
    """Wall seconds, device busy seconds (the sum of kernel times) and the top entries by self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        wall = timed(fn, cuda)
    events = prof.key_averages()

    def dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    def top(key):
        rows = sorted(events, key=key, reverse=True)[:TOP]
        return [dict(name=e.key[:160], calls=e.count, ms=round(key(e) / 1e3, 3)) for e in rows if key(e) > 0]
    busy = sum(dev(e) for e in events) / 1e6 if cuda else None
    return dict(wall_s=wall, device_busy_s=busy, device_busy_share=busy / wall if cuda else None,
                top_device=top(dev) if cuda else [], top_cpu=top(lambda e: e.self_cpu_time_total))


def python_profile(fn, cuda: bool) -> dict:
    prof = cProfile.Profile()
    wall = timed(lambda: prof.runcall(fn), cuda)
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)[:3 * TOP]
    return dict(wall_s=wall, top_cumulative=[
        dict(function=f"{Path(f).name}:{line}:{name}", calls=calls, cumulative_s=round(cum, 4), own_s=round(own, 4))
        for (f, line, name), (_, calls, own, cum, _) in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from probes import bench
    from probes.engine import Engine

    bench_argv = ["--quick", "--family", args.family] if args.quick else ["--shape", args.shape]
    bargs = bench.parse_args(bench_argv + (["--batch-size", str(args.batch_size)] if args.batch_size else []))
    if bargs.device == "cpu":
        torch.set_num_threads(bargs.threads)
    cuda = bargs.device.startswith("cuda")
    model, processor, what = bench.build_model(bargs)
    with tempfile.TemporaryDirectory(prefix="probes-profile-") as tmp:
        samples = bench.make_captions(args.captions, Path(tmp), 0, large=not args.quick)
        B, M = bargs.batch_size, args.max_new_tokens
        Engine(model, processor).teacher_forced(samples[:2], B)                         # warm-up
        Engine(model, processor).generate(samples[:2], B, max_new_tokens=2, stats=True)
        runs = {"teacher_forced": lambda: Engine(model, processor).teacher_forced(samples, B),
                "generate": lambda: Engine(model, processor).generate(samples, B, max_new_tokens=M, stats=True)}
        doc = dict(what=what, device=bargs.device, captions=len(samples), batch_size=B, max_new_tokens=M,
                   torch=torch.__version__)
        for name, fn in runs.items():
            doc[name] = dict(torch_profiler=torch_profile(fn, cuda), python=python_profile(fn, cuda))
            t = doc[name]["torch_profiler"]
            print(f"{name}: {t['wall_s']:.2f} s wall" + (f", device busy {t['device_busy_share']:.0%}" if cuda else ""),
                  flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
