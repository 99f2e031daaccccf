"""Side-by-side speed of four ways to measure output-distribution drift, on one model and one caption set.

    python -m probes.bench --quick                          # CPU, tiny model, well under a minute
    python -m probes.bench --shape qwen2_5_vl_7b            # GPU: random weights, real 7-8B dimensions
    python -m probes.bench --ckpt /ckpts/Qwen2.5-VL-7B-Instruct
    python -m probes.bench --quick --json bench.json      # the same figures, also as JSON

(1) the study's probe: per sample, HF `generate` with `output_scores=True`, full softmax, batch 1;
(2) a naive per-sample teacher-forced forward with a full-vocabulary softmax at every position;
(3) our teacher-forced engine; (4) our generation mode (batched greedy decoding, same max_new_tokens).
Every method includes its own preprocessing (images decoded from JPEG files). (1) runs on the first
--study-captions of the set (its rate does not depend on how many there are; it is by far the slowest),
the others on all. Then the vision/encoding caches: the second checkpoint of an LM-only recipe (the attention
projections changed in place) after the first. The last three lines are the speed-up ratios.

Model FLOPs (GPU: utilisation against the device's dense bf16 peak) are counted with hooks, as
2 x parameters x tokens: LM decoder parameters x real (unpadded) tokens it processes, output projection x
rows it is applied to (the engine: only scored rows), vision encoder x its positions, projector x its
output tokens; attention-score FLOPs and embedding lookups are not counted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from training.chat import collate, encode
from training.families import family_of_model, get_family

from .batching import EncodeCache
from .captions import Sample
from .engine import Engine
from .forward import caption_positions
from .vision_cache import VisionCache

WORDS = ("a the of on in with and two three small large red blue green white black man woman dog cat car "
         "street table food plate people group standing sitting next to near building tree sky water sign "
         "room window 3 12 2019 four ten photo view close up old young wooden metal").split()
INSTRUCTIONS = ["Describe the image concisely.", "Give a brief description of the image.",
                "Summarize the visual content of the image.", "Provide a brief description of the given image.",
                "Write a terse but informative summary of the picture."]
# Dense bf16 peak (no sparsity) by device name; --peak-tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m probes.bench", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--quick", action="store_true", help="CPU, the family's tiny model, small sizes")
    src.add_argument("--shape", help="a shipped 7-8B shape (probes/shapes/*.json) with random weights")
    src.add_argument("--ckpt", help="a local checkpoint folder (full, delta or adapter)")
    ap.add_argument("--family", default="qwen2_5_vl", help="tiny model's family (default qwen2_5_vl)")
    ap.add_argument("--num-captions", type=int, default=256, help="captions for (2), (3), (4) (default 256)")
    ap.add_argument("--study-captions", type=int, help="captions for the study probe (1) (GPU 16, CPU 64)")
    ap.add_argument("--batch-size", type=int, help="engine batch size (default 32; GPU 64)")
    ap.add_argument("--max-new-tokens", type=int, help="generation length for (1) and (4) (quick 32, else 256)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on the shared 2-core CPU, 2 threads are slower under load)")
    ap.add_argument("--workers", type=int, default=None, help="engine preprocessing processes (default: 0 on a "
                                                               "CPU, up to 8 beside a GPU)")
    ap.add_argument("--prefetch", type=int, default=None,
                    help="batches encoded ahead by a background thread (default: 2 on a GPU, 0 on a CPU)")
    ap.add_argument("--attn", default="auto", help="attention implementation on a GPU (auto: sdpa)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (GPU)")
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: by device name)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-cache", action="store_true", help="skip the two-checkpoint cache measurement")
    ap.add_argument("--json", metavar="PATH", help="also write every figure printed to PATH as JSON")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    gpu = args.device.startswith("cuda")
    if args.shape and not gpu and os.environ.get("PROBES_BENCH_ALLOW_CPU_SHAPE") != "1":
        ap.error(f"--shape {args.shape} builds a 7-8B model: it needs a GPU (no CUDA device here)")
    args.study_captions = min(args.num_captions, args.study_captions or (16 if gpu else 64))
    args.batch_size = args.batch_size or (64 if gpu else 32)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 256)
    for k in ("num_captions", "study_captions", "batch_size", "max_new_tokens"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be at least 1")
    return args


# -- the model and the captions --------------------------------------------------------------------
def build_model(args):
    """(model on the device, processor, description)."""
    gpu = args.device.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    attn = ("sdpa" if args.attn == "auto" else args.attn) if gpu else None
    if args.shape:
        from .shapes import build_shape

        model, processor = build_shape(args.shape, device=args.device, dtype=dtype, attn_implementation=attn)
        return model, processor, f"shape {args.shape} (random weights)"
    if args.ckpt:
        from training.checkpoints import LoadOptions, load

        model, processor = load(args.ckpt, LoadOptions(dtype=dtype, device=args.device, attn=attn))
        return model, processor, f"checkpoint {args.ckpt}"
    model, processor = get_family(args.family).build_tiny(seed=args.seed)
    return model.to(args.device, dtype), processor, f"{args.family} tiny model"


def make_captions(n: int, root: Path, seed: int, large: bool) -> list[Sample]:
    """n synthetic caption records with JPEG images on disk (LCS-558K-like sizes for the large models)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for i in range(n):
        w, h = (rng.choice([(500, 375), (640, 480), (375, 500), (500, 333), (640, 427), (480, 640)]) if large
                else (rng.randint(16, 96), rng.randint(16, 96)))
        im = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in "rgb"))
        draw = ImageDraw.Draw(im)
        for _ in range(rng.randint(1, 6)):
            x, y = rng.randrange(w), rng.randrange(h)
            draw.rectangle([x, y, x + rng.randint(2, w // 2 + 2), y + rng.randint(2, h // 2 + 2)],
                           fill=tuple(rng.randrange(256) for _ in "rgb"))
        name = f"{i:05d}.jpg"
        im.save(root / name, quality=90)
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
        out.append(Sample(f"b{i}", rng.choice(INSTRUCTIONS), caption, str(root / name), name))
    return out


# -- measuring -------------------------------------------------------------------------------------
class FlopCounter:
    """Model FLOPs as 2 x parameters x tokens, counted with forward hooks (see the module docstring) and, for
    the engines' output projection, from the logits blocks they report (passed to them as `counter`)."""

    def __init__(self, model, family):
        def params(path):
            try:
                return sum(p.numel() for p in model.get_submodule(path).parameters())
            except AttributeError:
                return 0
        self.model, self.hidden = model, model.get_output_embeddings().weight.shape[1]
        emb = model.get_input_embeddings().weight.numel()
        self.n_lm = params(family.lm) - emb
        self.n_head = model.get_output_embeddings().weight.numel()
        self.n_proj = sum(params(p) for p in family.projector)
        nested = sum(params(p) for p in family.projector if p.startswith(family.vision + "."))
        self.n_vis = params(family.vision) - nested
        self.flops = 0.0
        self.handles = []

        def lm_hook(mod, args, kwargs):
            x = kwargs.get("inputs_embeds")
            x = x if x is not None else kwargs.get("input_ids")
            if x is None:
                return
            mask = kwargs.get("attention_mask")
            T = x.shape[1]
            tokens = int(mask[:, -T:].sum()) if torch.is_tensor(mask) and mask.dim() == 2 else x.shape[0] * T
            self.flops += 2 * self.n_lm * tokens

        def rows_hook(n):
            def hook(mod, args, out):
                t = getattr(out, "last_hidden_state", out)
                t = t[0] if isinstance(t, (tuple, list)) else t
                self.flops += 2 * n * t.shape[:-1].numel()
            return hook
        self.handles.append(model.get_submodule(family.lm).register_forward_pre_hook(lm_hook, with_kwargs=True))
        self.handles.append(model.get_output_embeddings().register_forward_hook(rows_hook(self.n_head)))
        self.handles.append(model.get_submodule(family.vision).register_forward_hook(rows_hook(self.n_vis)))
        for p in family.projector:
            mod = model.get_submodule(p) if _is_module(model, p) else None
            if mod is not None:
                self.handles.append(mod.register_forward_hook(rows_hook(sum(x.numel() for x in mod.parameters()))))

    def add_logits(self, rows: int, cols: int, width: int) -> None:
        """The engine's output projection, one vocabulary block (`probes.vocab.Counter`)."""
        self.flops += 2 * rows * cols * width

    def close(self):
        for h in self.handles:
            h.remove()


def _is_module(model, path) -> bool:
    try:
        return isinstance(model.get_submodule(path), torch.nn.Module)
    except AttributeError:
        return False


def _rss_peak_kib() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


class PeakMemory:
    """Peak memory during a block: the CUDA allocator's peak on a GPU; on a CPU the process's peak resident
    set (Linux VmHWM, reset through /proc/self/clear_refs, no sampling overhead)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")     # reset the peak to the current RSS
        except OSError:
            pass
        peak = _rss_peak_kib()
        self.base = peak * 1024 if peak is not None else float("nan")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_total = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_peak_kib()
            self.peak_total = peak * 1024 if peak is not None else float("nan")
        self.extra = self.peak_total - self.base
        return False


@dataclass
class Result:
    name: str
    n: int
    seconds: float
    flops: float
    peak_total: int
    peak_extra: int
    values: object = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def measure(name, fn, n, device, counter) -> Result:
    counter.flops = 0.0
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        values = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return Result(name, n, seconds, counter.flops, mem.peak_total, mem.extra, values)


# -- the two per-sample baselines ------------------------------------------------------------------
def _single(processor, fam, pad_id, sample, answer, device, dtype):
    ex = encode(processor, sample.open_image(), sample.instruction, answer)
    b = collate([ex], fam, pad_id)
    answer_mask = b.pop("answer_mask")[0]
    b.pop("eot_mask")
    b = {k: v.to(device, dtype=dtype if v.is_floating_point() else None) for k, v in b.items()}
    return ex, b, answer_mask


def _full_softmax_stats(logits: torch.Tensor, set_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number mass, entropy) per row from the full-vocabulary softmax, fp32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return p[:, set_idx].sum(-1), -(p * logp).sum(-1)


@torch.inference_mode()
def study_probe(model, processor, samples, max_new_tokens, set_ids, stop_ids, pad_id):
    """The study's way: per sample, generate with output_scores, then a full softmax over every step."""
    from transformers import GenerationConfig

    fam, device, dtype = family_of_model(model), model.device, model.dtype
    idx = torch.tensor(set_ids, device=device)
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=sorted(stop_ids),
                           pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True)
    out = []
    for s in samples:
        ex, b, _ = _single(processor, fam, pad_id, s, None, device, dtype)
        g = model.generate(**b, generation_config=cfg)
        mass, ent = _full_softmax_stats(torch.cat(g.scores), idx)
        out.append((g.sequences[0, len(ex):].tolist(), float(mass.mean()), float(ent.mean())))
    return out


@torch.inference_mode()
def naive_teacher_forced(model, processor, samples, set_ids, pad_id):
    """Per sample: the model's full logits at every position, a full softmax, then the caption positions."""
    fam, device, dtype = family_of_model(model), model.device, model.dtype
    idx = torch.tensor(set_ids, device=device)
    out = []
    for s in samples:
        _, b, answer = _single(processor, fam, pad_id, s, s.caption, device, dtype)
        logits = model(**b).logits[0]
        mass, ent = _full_softmax_stats(logits, idx)
        sel = caption_positions(answer[None].to(device))[0]
        out.append((float(mass[sel].mean()), float(ent[sel].mean())))
    return out


# -- the run ---------------------------------------------------------------------------------------
def perturb_lm_attention(model, family, seed: int = 0) -> None:
    """An LM-only stage in place: the attention projections change, the vision side stays bitwise."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for layer in model.get_submodule(family.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = getattr(layer.self_attn, name).weight
                w.add_((torch.randn(w.shape, generator=g) * 0.02).to(w.device, w.dtype))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cpu_name() -> str:
    try:
        model = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "cpu"
    return f"{model}, {os.cpu_count()} cores"


def device_peak(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(args.device))
    for key, tf in PEAK_TFLOPS.items():       # "H100 PCIe" before "H100": dict order
        if all(part in name for part in key.split()):
            return tf * 1e12
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    model, processor, what = build_model(args)
    family = family_of_model(model)
    counter = FlopCounter(model, family)
    gpu = args.device.startswith("cuda")
    peak = device_peak(args)
    n_params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"probes.bench {datetime.date.today().isoformat()} on {platform.node()}: {what}, {n_params / 1e6:.2f}M "
          f"parameters (LM {counter.n_lm / 1e6:.2f}M, output projection {counter.n_head / 1e6:.2f}M, vision "
          f"{counter.n_vis / 1e6:.2f}M, projector {counter.n_proj / 1e6:.2f}M), vocabulary {counter.n_head // counter.hidden}")
    dev_name = torch.cuda.get_device_name(torch.device(args.device)) if gpu else cpu_name()
    print(f"  device {args.device} ({dev_name}), {model.dtype}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"torch thread(s), load average {load:.2f}; {args.num_captions} captions (study probe: "
          f"{args.study_captions}), batch {args.batch_size}, max_new_tokens {args.max_new_tokens}")

    with tempfile.TemporaryDirectory(prefix="probes-bench-") as tmp:
        large = bool(args.shape or args.ckpt)
        samples = make_captions(args.num_captions, Path(tmp), args.seed, large)
        few = samples[:args.study_captions]
        probe_eng = Engine(model, processor, prefetch=args.prefetch, workers=args.workers, compile=args.compile)
        set_ids, stop_ids, pad_id = probe_eng.set_ids["number"], probe_eng.stop_ids, probe_eng.pad_id
        # as probes.run does: the token sets are found once per tokenizer, not per checkpoint
        kw = dict(prefetch=args.prefetch, workers=args.workers, set_ids=probe_eng.set_ids, counter=counter)

        # warm-up (not timed): first calls, kernel selection, the once-per-process embeddings-path check
        warm = samples[:2]
        study_probe(model, processor, warm[:1], 2, set_ids, stop_ids, pad_id)
        naive_teacher_forced(model, processor, warm, set_ids, pad_id)
        Engine(model, processor, vision_cache=VisionCache(), **kw).teacher_forced(warm, args.batch_size)
        Engine(model, processor, **kw).generate(warm, args.batch_size, max_new_tokens=2, stats=True)

        B, M = args.batch_size, args.max_new_tokens
        results = [
            measure("(1) study probe: per-sample generate + full softmax",
                    lambda: study_probe(model, processor, few, M, set_ids, stop_ids, pad_id), len(few), args.device,
                    counter),
            measure("(2) naive per-sample teacher-forced, full softmax",
                    lambda: naive_teacher_forced(model, processor, samples, set_ids, pad_id), len(samples),
                    args.device, counter),
            measure("(3) teacher-forced engine",
                    lambda: Engine(model, processor, **kw).teacher_forced(samples, B), len(samples), args.device,
                    counter),
            measure("(4) generation engine",
                    lambda: Engine(model, processor, **kw).generate(samples, B, max_new_tokens=M, stats=True),
                    len(samples), args.device, counter),
        ]
        study, naive, tf, gen = results
        print(f"\n{'method':<56}{'captions':>9}{'seconds':>10}{'pairs/s':>10}{'peak mem':>11}{'(+run)':>11}"
              + (f"{'TFLOP/s':>9}{'MFU':>7}" if gpu else f"{'GFLOP/s':>9}"))
        for r in results:
            rate = r.flops / r.seconds
            flops = f"{rate / 1e12:>9.1f}" + (f"{rate / peak:>7.1%}" if peak else f"{'n/a':>7}") if gpu \
                else f"{rate / 1e9:>9.2f}"
            print(f"{r.name:<56}{r.n:>9}{r.seconds:>10.3f}{r.rate:>10.1f}{fmt_bytes(r.peak_total):>11}"
                  f"{fmt_bytes(r.peak_extra):>11}" + flops)
        print("  peak mem: CUDA allocator peak (weights included); (+run): above the start"
              if gpu else "  peak mem: process RSS peak; (+run): above the RSS at the start of the method")
        if gpu and peak:
            print(f"  MFU = counted model FLOPs / seconds / {peak / 1e12:.0f} TFLOP/s (dense bf16 peak of the device)")

        # the engines compute what the per-sample methods compute
        d_mass = max(abs(tf.values[i]["number_mass"] - m) for i, (m, _) in enumerate(naive.values))
        d_ent = max(abs(tf.values[i]["entropy"] - e) for i, (_, e) in enumerate(naive.values))
        same = [gen.values[i].token_ids == toks for i, (toks, _, _) in enumerate(study.values)]
        d_gen = max([abs(gen.values[i].stats["number_mass"] - m)
                     for i, (_, m, _) in enumerate(study.values) if same[i]] or [float("nan")])
        print(f"agreement: teacher-forced engine vs naive: max |diff| number_mass {d_mass:.1e}, entropy {d_ent:.1e}; "
              f"generation engine vs study: {sum(same)}/{len(same)} identical token sequences, max |diff| "
              f"number_mass {d_gen:.1e}")

        cache = None if args.skip_cache else cache_line(model, processor, family, samples, B, kw, args.device)
    counter.close()
    print(f"speedup teacher-forced engine vs naive per-sample: {tf.rate / naive.rate:.1f}x")
    print(f"speedup teacher-forced engine vs study probe: {tf.rate / study.rate:.1f}x")
    print(f"speedup generation engine vs study probe: {gen.rate / study.rate:.1f}x")
    if args.json:
        agreement = dict(tf_vs_naive_number_mass=d_mass, tf_vs_naive_entropy=d_ent, gen_identical=sum(same),
                         gen_compared=len(same), gen_vs_study_number_mass=d_gen)
        header = dict(what=what, n_params=n_params, n_lm=counter.n_lm, n_head=counter.n_head, n_vis=counter.n_vis,
                      n_proj=counter.n_proj, vocab=counter.n_head // counter.hidden, device_name=dev_name,
                      dtype=str(model.dtype).removeprefix("torch."), load=load,
                      argv=list(argv) if argv is not None else sys.argv[1:])
        write_json(args.json, json_report(args, header, results, peak, agreement, cache))
    return 0


METHOD_KEYS = ("study", "naive", "tf_engine", "gen_engine")


def json_report(args, header: dict, results: list[Result], peak: float | None, agreement: dict,
                cache: dict | None) -> dict:
    """Everything the bench printed, as one JSON-ready dict (rates in pairs/s, memory in bytes)."""
    import transformers

    methods = {}
    for key, r in zip(METHOD_KEYS, results):
        rate = r.flops / r.seconds
        methods[key] = dict(name=r.name, captions=r.n, seconds=r.seconds, pairs_per_s=r.rate, flops=r.flops,
                            flops_per_s=rate, mfu=rate / peak if peak else None, peak_mem_bytes=r.peak_total,
                            peak_extra_bytes=r.peak_extra)
    study, naive, tf, gen = results
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
        shape=args.shape, ckpt=args.ckpt, family=None if (args.shape or args.ckpt) else args.family,
        device=args.device, torch=torch.__version__, transformers=transformers.__version__,
        peak_tflops=peak / 1e12 if peak else None, captions=args.num_captions, study_captions=args.study_captions,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, compile=args.compile, attn=args.attn,
        workers=args.workers, prefetch=args.prefetch, **header, methods=methods, agreement=agreement, cache=cache,
        ratios=dict(tf_vs_naive=tf.rate / naive.rate, tf_vs_study=tf.rate / study.rate,
                    gen_vs_study=gen.rate / study.rate))


def write_json(path: str, report: dict) -> None:
    """Strict JSON: NaN and infinities (a figure that could not be measured) become null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(report), indent=1, allow_nan=False) + "\n")


def cache_line(model, processor, family, samples, batch_size, kw, device) -> dict:
    """Two checkpoints of an LM-only recipe sharing the encode and vision caches, teacher-forced; prints the
    line and returns its figures."""
    enc, vis = EncodeCache(), VisionCache()

    def probe(cached: bool):
        eng = Engine(model, processor, encode_cache=enc if cached else None, vision_cache=vis if cached else None,
                     **kw)
        return eng.teacher_forced(samples, batch_size)

    def timed(fn):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    t1, _ = timed(lambda: probe(True))
    perturb_lm_attention(model, family)
    t2, second = timed(lambda: probe(True))
    reuse = vis.hits
    fresh = probe(False)
    diff = max(abs(second[i][k] - fresh[i][k]) for i in fresh for k in ("number_mass", "entropy"))
    print(f"cache: first checkpoint {t1:.3f} s, second (LM-only change, {reuse} image features and "
          f"{len(enc.store)} encodings reused) {t2:.3f} s = {t2 / t1:.2f} of the first (goal <= 0.60); "
          f"cached vs uncached max |diff| {diff:.1e}")
    return dict(first_s=t1, second_s=t2, ratio=t2 / t1, image_features_reused=reuse, encodings_reused=len(enc.store),
                cached_vs_uncached_max_diff=diff)


if __name__ == "__main__":
    sys.exit(main())
