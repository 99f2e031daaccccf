"""`make gpu-check`: one prepared command for a lent GPU, under one time limit (issue 16).

    python3 scripts/gpu_check.py --out runs/gpu-check     # a GPU machine: default limit 8 minutes
    python3 scripts/gpu_check.py --quick                  # the same flow on a CPU with tiny models
    python3 scripts/gpu_check.py --list                   # the plan, with each step's expected seconds

Steps, most important first (a step that cannot fit in what is left of the limit is skipped, saying so):
the GPU tests (`pytest -m gpu`, only the files that carry the mark, so that collection needs nothing but
pytest and the toolkit's own imports), then `probes.bench` at the real 7-8B shapes with random weights:
every shape without --compile, a second Qwen2.5-VL run with fewer captions (peak memory must not grow with
the number of captions), a profile of where the engines' time goes on that shape (scripts/gpu_profile.py),
then every shape with --compile. Each step runs as a subprocess with its own
timeout (what is left of the limit, at most a few times its expected seconds), its output in OUT/NAME.log;
each result lands as OUT/NAME.json as soon as it exists, and OUT/summary.json is rewritten after every
step, so a time-out keeps what finished. A summary table and the issue's goals are printed at the end.

--quick runs the same flow on a CPU: each shape's family's tiny model, a few captions and tokens, one
--compile run (inductor on a CPU takes minutes), and first a check that every shipped shape builds (on the
meta device) with this transformers. It needs no GPU and must exit 0.
Needs only torch, torchvision, transformers, pytest (and what the toolkit imports): no `datasets`, no
network; the repository root goes on PYTHONPATH, so no install is needed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the toolkit's packages live at the repository root

# The real shapes -> their family (whose tiny model --quick uses), in the order they are measured; the first
# one carries the goals.
SHAPES = {"qwen2_5_vl_7b": "qwen2_5_vl", "llava_onevision_7b": "llava_onevision", "llava_next_8b": "llava_next"}
# Shapes that join the plan (after SHAPES) by themselves once their file exists in probes/shapes.
LATER = {"qwen3_vl_8b": "qwen3_vl"}
LATER_WHY = "needs the any-model issue: a Qwen3-VL family adapter and probes/shapes/qwen3_vl_8b.json"
GOAL_SHAPE = "qwen2_5_vl_7b"

# Sizes. GPU: about 5 s per caption for the per-sample study probe at 7B and 256 new tokens, so it gets a
# handful; the engines get several batches of 64. Expected seconds are estimates until a GPU run measures
# them (process start and a random 7-8B build included; --compile adds per-layer recompiles).
GPU_BENCH = dict(max_new_tokens=256, batch_size=64)
GPU_SIZES = {  # variant -> (captions, study captions, skip the cache measurement, expected seconds)
    "": (192, 3, False, 95), "mem": (64, 1, True, 40), "other": (64, 2, False, 85), "compile": (64, 1, True, 150)}
QUICK_BENCH = dict(max_new_tokens=8, batch_size=4)
QUICK_SIZES = {"": (12, 2, False, 20), "mem": (4, 1, True, 12), "other": (12, 2, False, 20),
               "compile": (4, 1, True, 150)}
TEST_SECONDS = {False: 90, True: 15}
PROFILE = {False: (["--shape", GOAL_SHAPE, "--captions", "128", "--max-new-tokens", "32"], 45),
           True: (["--quick", "--family", SHAPES[GOAL_SHAPE], "--captions", "8", "--batch-size", "4",
                   "--max-new-tokens", "8"], 25)}
TIMEOUT_FACTOR = 3.0     # a step's timeout: at most this many times its expected seconds ...
MIN_FRACTION = 0.5       # ... and a step is skipped when less than this share of them is left
RESERVE_S = 5.0          # kept for the summary
MEMORY_FLAT = 1.10       # peak memory above the start may grow this much from 1 batch to 3 and still be flat
GOALS = {"tf_vs_study": 50.0, "mfu": 0.40, "gen_vs_study": 10.0, "cache": 0.60}

SHAPES_CHECK = """
from PIL import Image
from probes.shapes import build_shape, shape_names
from training.chat import encode
for name in shape_names():
    model, processor = build_shape(name, device="meta")
    ex = encode(processor, Image.new("RGB", (500, 375)), "Describe the image.", "a cat")
    n = int((ex.input_ids == model.config.image_token_id).sum())
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {n} image tokens")
"""


@dataclass
class Step:
    name: str                 # also the stem of OUT/NAME.json and OUT/NAME.log
    kind: str                 # "tests", "bench", "profile" (these two write OUT/NAME.json) or "check"
    argv: list[str]           # after the python executable
    expected_s: float
    status: str = "pending"   # ok, failed, timeout, skipped
    reason: str = ""
    seconds: float | None = None
    timeout_s: float | None = None
    rc: int | None = None
    result: dict | None = field(default=None, repr=False)


def gpu_test_files() -> list[str]:
    """The test files that carry the gpu mark: only these are collected."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def bench_step(shape: str, variant: str, quick: bool) -> Step:
    sizes, common = (QUICK_SIZES, QUICK_BENCH) if quick else (GPU_SIZES, GPU_BENCH)
    captions, study, skip_cache, expected = sizes[variant]
    source = ["--quick", "--family", {**SHAPES, **LATER}[shape]] if quick else ["--shape", shape]
    argv = ["-m", "probes.bench", *source, "--num-captions", str(captions), "--study-captions", str(study),
            "--batch-size", str(common["batch_size"]), "--max-new-tokens", str(common["max_new_tokens"])]
    if variant == "compile":
        argv.append("--compile")
        if quick:   # inductor compiles each recompile in minutes on a CPU: the tiniest workload
            argv[argv.index("--max-new-tokens") + 1] = "2"
    if skip_cache:
        argv.append("--skip-cache")
    name = shape if variant in ("", "other") else f"{shape}-{variant}"
    return Step(name, "bench", argv, expected)


def plan(quick: bool) -> list[Step]:
    """Every step in the order it runs; shapes that cannot be measured yet appear as skipped."""
    shipped = {p.stem for p in (ROOT / "probes" / "shapes").glob("*.json")}
    shapes = list(SHAPES) + [s for s in LATER if s in shipped]
    steps = [Step("shapes", "check", ["-c", SHAPES_CHECK], 15)] if quick else []
    steps.append(Step("tests", "tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                          *gpu_test_files()], TEST_SECONDS[quick]))
    steps.append(bench_step(shapes[0], "", quick))
    steps.append(bench_step(shapes[0], "mem", quick))
    profile_args, profile_s = PROFILE[quick]
    steps.append(Step(f"{shapes[0]}-profile", "profile", ["scripts/gpu_profile.py", *profile_args], profile_s))
    steps += [bench_step(s, "other", quick) for s in shapes[1:]]
    for s in shapes:
        step = bench_step(s, "compile", quick)
        if quick and s != shapes[0]:
            step.status, step.reason = "skipped", "quick mode compiles one shape only (inductor on a CPU: minutes)"
        steps.append(step)
    steps += [Step(s, "bench", [], 0, "skipped", LATER_WHY) for s in LATER if s not in shipped]
    return steps


# -- running ---------------------------------------------------------------------------------------
def child_env() -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def step_timeout(step: Step, left: float) -> float | None:
    """Seconds this step may run, or None when too little is left to start it."""
    if left < MIN_FRACTION * step.expected_s or left < 1:
        return None
    return min(left, TIMEOUT_FACTOR * step.expected_s)


def run_step(step: Step, out: Path, timeout: float, python: str) -> None:
    """Run one step as its own process group (killed whole at its timeout); collect its JSON."""
    argv = list(step.argv)
    if step.kind in ("bench", "profile"):
        argv += ["--json", str(out / f"{step.name}.json")]
    elif step.kind == "tests":
        at = argv.index("gpu") + 1
        argv[at:at] = ["--junitxml", str(out / "tests.xml")]
    log = out / f"{step.name}.log"
    step.timeout_s = round(timeout, 1)
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {python} {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen([python, *argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
                                start_new_session=True)
        try:
            step.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:                                    # at the timeout, or when this script is stopped
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)     # the whole group: the bench's DataLoader workers too
                proc.wait()
    step.seconds = round(time.monotonic() - t0, 1)
    collect(step, out, log)


def collect(step: Step, out: Path, log: Path) -> None:
    """Set the step's status and result from its exit code and the files it wrote."""
    if step.rc is None:
        step.status, step.reason = "timeout", f"killed after {step.timeout_s:.0f} s; see {log.name}"
        if step.kind == "tests":
            step.result = tests_from_log(log)
        return
    if step.kind == "tests":
        step.result = tests_from_junit(out / "tests.xml") or tests_from_log(log)
        (out / "tests.json").write_text(json.dumps(step.result, indent=1) + "\n")
    elif step.kind in ("bench", "profile") and (out / f"{step.name}.json").is_file():
        step.result = json.loads((out / f"{step.name}.json").read_text())
    elif step.kind == "check":
        step.result = {"lines": log.read_text().splitlines()[1:]}
    ok = step.rc == 0 and step.result is not None
    step.status = "ok" if ok else "failed"
    if not ok:
        tail = [ln for ln in log.read_text().splitlines() if ln.strip()][-1:] or ["no output"]
        step.reason = f"exit {step.rc}: {tail[0][:300]}"


def tests_from_junit(path: Path) -> dict | None:
    if not path.is_file():
        return None
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}: {(c[0].get('message') or '')[:200]}"
              for c in suite.iter("testcase") if len(c) and c[0].tag in ("failure", "error")]
    return dict(passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], failed=n["failures"],
                errors=n["errors"], skipped=n["skipped"], seconds=float(suite.get("time", 0)), failures=failed)


def tests_from_log(log: Path) -> dict:
    """What pytest's closing line says (a killed run writes no junit file)."""
    text = log.read_text() if log.is_file() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", text)}
    return dict(passed=counts.get("passed", 0), failed=counts.get("failed", 0),
                errors=counts.get("error", 0) + counts.get("errors", 0), skipped=counts.get("skipped", 0),
                seconds=None, failures=[])


def preflight(quick: bool) -> tuple[dict, dict[str, str]]:
    """(the environment, reasons that rule out whole kinds of step)."""
    import torch

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               cuda=torch.cuda.is_available(), mode="quick (CPU, tiny models)" if quick else "GPU")
    env["device"] = torch.cuda.get_device_name(0) if env["cuda"] else "cpu"
    for mod in ("torchvision", "transformers", "peft", "accelerate", "datasets", "flash_attn", "pytest",
                "hypothesis"):
        spec = importlib.util.find_spec(mod)
        env[mod] = _version(mod) if spec else None
    env["commit"] = _git_commit()
    try:        # DataLoader workers pass batches through shared memory: a small /dev/shm breaks them
        st = os.statvfs("/dev/shm")
        env["dev_shm_free_gib"] = round(st.f_bavail * st.f_frsize / 2**30, 1)
    except OSError:
        env["dev_shm_free_gib"] = None
    blocked = {}
    if not quick and not env["cuda"]:
        blocked["tests"] = blocked["bench"] = blocked["profile"] = "no CUDA device here (torch.cuda.is_available() is False); " \
                                              "--quick checks the flow on a CPU"
    if env["pytest"] is None:
        blocked["tests"] = "pytest is not installed"
    try:
        importlib.import_module("probes.bench")
    except Exception as e:  # noqa: BLE001  (any import failure rules the bench out; say which)
        blocked["bench"] = blocked["profile"] = blocked["check"] = f"probes.bench does not import: {type(e).__name__}: {e}"
    return env, blocked


def _version(mod: str) -> str:
    try:
        from importlib.metadata import version

        return version({"flash_attn": "flash-attn"}.get(mod, mod))
    except Exception:  # noqa: BLE001  (installed without metadata)
        return "present"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- the summary -----------------------------------------------------------------------------------
def goals(steps: list[Step]) -> list[dict]:
    """The issue's goals, from the goal shape's runs (with and without fewer captions)."""
    by = {s.name: s.result for s in steps if s.status == "ok" and s.kind == "bench"}
    main, few = by.get(GOAL_SHAPE), by.get(f"{GOAL_SHAPE}-mem")
    out = []

    def goal(text, value, met, how):
        out.append(dict(goal=text, measured=value, met=met, how=how))
    if main:
        r, tf = main["ratios"], main["methods"]["tf_engine"]
        goal(f"teacher-forced engine >= {GOALS['tf_vs_study']:.0f}x the study probe", r["tf_vs_study"],
             r["tf_vs_study"] >= GOALS["tf_vs_study"], "pairs/s ratio")
        goal(f">= {GOALS['mfu']:.0%} MFU, teacher-forced engine", tf["mfu"],
             None if tf["mfu"] is None else tf["mfu"] >= GOALS["mfu"], "counted FLOPs / s / dense bf16 peak")
        goal(f"generation engine >= {GOALS['gen_vs_study']:.0f}x the study probe", r["gen_vs_study"],
             r["gen_vs_study"] >= GOALS["gen_vs_study"], "pairs/s ratio")
        cache = (main.get("cache") or {}).get("ratio")
        goal(f"second checkpoint (LM-only) <= {GOALS['cache']:.0%} of the first", cache,
             None if cache is None else cache <= GOALS["cache"], "seconds ratio, vision and encode caches")
    if main and few:
        for key, label in (("tf_engine", "teacher-forced"), ("gen_engine", "generation")):
            a, b = few["methods"][key]["peak_extra_bytes"], main["methods"][key]["peak_extra_bytes"]
            ratio = b / a if a and b is not None else None
            goal(f"peak memory flat in captions, {label} engine", ratio,
                 None if ratio is None else ratio <= MEMORY_FLAT,
                 f"peak above start at {main['captions']} captions / at {few['captions']}")
    return out


def _fmt(v, spec=".1f", none="-"):
    return none if v is None else format(v, spec)


def summary_table(steps: list[Step]) -> str:
    head = (f"{'step':<28}{'status':<9}{'s':>6}{'(1)/s':>8}{'(2)/s':>8}{'(3)/s':>8}{'(4)/s':>8}{'(3)/(1)':>9}"
            f"{'(4)/(1)':>9}{'MFU(3)':>8}{'cache':>7}{'peak(3)':>9}{'agree':>7}")
    lines = [head]
    for s in steps:
        row = f"{s.name:<28}{s.status:<9}{_fmt(s.seconds, '.0f'):>6}"
        r = s.result if s.kind == "bench" else None
        if r:
            m = r["methods"]
            rates = "".join(f"{_fmt(m[k]['pairs_per_s']):>8}" for k in ("study", "naive", "tf_engine", "gen_engine"))
            mfu = m["tf_engine"]["mfu"]
            agree = f"{r['agreement']['gen_identical']}/{r['agreement']['gen_compared']}"
            row += (rates + f"{_fmt(r['ratios']['tf_vs_study']):>9}{_fmt(r['ratios']['gen_vs_study']):>9}"
                    f"{_fmt(None if mfu is None else 100 * mfu, '.1f'):>8}"
                    f"{_fmt((r.get('cache') or {}).get('ratio'), '.2f'):>7}"
                    f"{_fmt(m['tf_engine']['peak_mem_bytes'] / 2**30, '.1f'):>8}G{agree:>7}")
        elif s.kind == "profile" and s.result:
            busy = [s.result[k]["torch_profiler"]["device_busy_share"] for k in ("teacher_forced", "generate")]
            row += "  device busy: " + ", ".join(f"{k} {'-' if b is None else f'{100 * b:.0f}%'}"
                                                 for k, b in zip(("teacher-forced", "generation"), busy))
        elif s.kind == "tests" and s.result:
            t = s.result
            row += f"  {t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
        if s.reason:
            row += f"  [{s.reason}]"
        lines.append(row)
    return "\n".join(lines)


MD_HEAD = ("| date | device | shape, run | captions (study) | (1) / (2) / (3) / (4) pairs/s | (3)/(1), goal >= 50x "
           "| MFU (3), goal >= 40% | (4)/(1), goal >= 10x | cache 2nd/1st, goal <= 0.60 | peak (3) / (4) GiB "
           "| peak flat in captions, (3) / (4) | agreement (4) vs (1) |")


def markdown_rows(steps: list[Step], doc: dict) -> list[str]:
    """BENCHMARKS.md's GPU table rows, the GPU tests' line and the profile's line, from this run."""
    env, flat = doc["env"], {g["goal"].rsplit(", ", 1)[1]: g for g in doc["goals"] if g["goal"].startswith("peak")}
    date, device = env["date"][:10], env["device"]
    rows = [MD_HEAD, "|" + "---|" * (MD_HEAD.count(" | ") + 1)]
    for s in steps:
        r = s.result if s.kind == "bench" and s.status == "ok" else None
        if r is None:
            continue
        m, ratio = r["methods"], r["ratios"]
        suffix = s.name.split("-", 1)[1] if "-" in s.name else ""
        run = {"": "plain", "mem": "fewer captions", "compile": "--compile"}.get(suffix, suffix)
        rates = " / ".join(_fmt(m[k]["pairs_per_s"]) for k in ("study", "naive", "tf_engine", "gen_engine"))
        mfu = m["tf_engine"]["mfu"]
        peaks = " / ".join(_fmt(m[k]["peak_mem_bytes"] / 2**30) for k in ("tf_engine", "gen_engine"))
        flat_cell = " / ".join(f"x{_fmt(flat[k]['measured'], '.2f')}" for k in ("teacher-forced engine",
                                                                              "generation engine")
                               if k in flat) if s.name == GOAL_SHAPE else ""
        a = r["agreement"]
        rows.append(f"| {date} | {device} | {r['shape'] or r['family'] + ' tiny'}, {run} | {r['captions']} "
                    f"({r['study_captions']}) | {rates} | {_fmt(ratio['tf_vs_study'])}x "
                    f"| {'-' if mfu is None else f'{100 * mfu:.1f}%'} | {_fmt(ratio['gen_vs_study'])}x "
                    f"| {_fmt((r.get('cache') or {}).get('ratio'), '.2f')} | {peaks} | {flat_cell} "
                    f"| {a['gen_identical']}/{a['gen_compared']} identical; TF vs naive number_mass "
                    f"{_fmt(a['tf_vs_naive_number_mass'], '.1e')} |")
    for s in steps:
        if s.kind == "tests" and s.result:
            t = s.result
            rows.append(f"\nGPU tests (`pytest -m gpu`), {date}, {device}: {t['passed']} passed, {t['failed']} failed, "
                        f"{t['errors']} errors, {t['skipped']} skipped" + "".join(f"\n- {f}" for f in t["failures"]))
        if s.kind == "profile" and s.status == "ok":
            rows.append(profile_line(s.result))
    return rows


def profile_line(r: dict) -> str:
    parts = []
    for key, label in (("teacher_forced", "teacher-forced"), ("generate", "generation")):
        t = r[key]["torch_profiler"]
        busy = "" if t["device_busy_share"] is None else f", device busy {100 * t['device_busy_share']:.0f}%"
        top = "; ".join(f"{e['name'][:60]} {e['ms']:.0f} ms" for e in (t["top_device"] or t["top_cpu"])[:3])
        parts.append(f"{label} {t['wall_s']:.2f} s wall{busy} (top: {top})")
    return f"\nWhere the time goes ({r['what']}, {r['captions']} captions, batch {r['batch_size']}, " \
           f"{r['max_new_tokens']} new tokens): " + "; ".join(parts)


def write_summary(out: Path, env: dict, steps: list[Step], budget: float, started: float) -> dict:
    doc = dict(env=env, budget_s=budget, elapsed_s=round(time.monotonic() - started, 1),
               steps=[asdict(s) for s in steps], goals=goals(steps))
    (out / "summary.json").write_text(json.dumps(doc, indent=1) + "\n")
    return doc


# -- the command -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same flow on a CPU with tiny models")
    ap.add_argument("--out", help="results folder (default runs/gpu-check, runs/gpu-check-quick with --quick)")
    ap.add_argument("--budget", type=float, default=480.0, help="overall limit in seconds (default 480)")
    ap.add_argument("--only", help="comma-separated step names (see --list): rerun only these")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps (default: this one)")
    return ap.parse_args(argv)


def interrupt(signum, frame):
    """SIGTERM (an outer `timeout`) stops the check like Ctrl-C: the running step is killed, the summary kept."""
    raise KeyboardInterrupt


def run_plan(steps: list[Step], out: Path, env: dict, blocked: dict, args, started: float) -> None:
    deadline = started + args.budget
    for s in steps:
        if s.status == "skipped":
            continue
        left = deadline - time.monotonic() - RESERVE_S
        timeout = step_timeout(s, left)
        if s.kind in blocked:
            s.status, s.reason = "skipped", blocked[s.kind]
        elif timeout is None:
            s.status, s.reason = "skipped", f"out of time: {left:.0f} s left, expected {s.expected_s:.0f} s"
        else:
            try:
                run_step(s, out, timeout, args.python)
            except KeyboardInterrupt:
                s.status, s.reason = "timeout", "interrupted (SIGTERM or Ctrl-C)"
                for rest in steps:
                    if rest.status == "pending":
                        rest.status, rest.reason = "skipped", "interrupted"
            if s.kind == "tests" and s.status == "ok" and env["cuda"] and s.result["skipped"]:
                s.status, s.reason = "failed", f"{s.result['skipped']} GPU test(s) skipped on a GPU machine"
        print(f"[{time.monotonic() - started:5.0f} s] {s.name}: {s.status}"
              + (f" in {s.seconds:.0f} s" if s.seconds is not None else "") + (f" ({s.reason})" if s.reason else ""),
              flush=True)
        write_summary(out, env, steps, args.budget, started)


def report(steps: list[Step], doc: dict, quick: bool) -> None:
    print("\n" + summary_table(steps))
    print("  (1) study probe, (2) naive per-sample, (3) teacher-forced engine, (4) generation engine: pairs/s; "
          "peak(3): allocator/RSS peak, GiB; agree: identical greedy sequences (4) vs (1)")
    for g in doc["goals"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        print(f"goal: {g['goal']}: {_fmt(g['measured'], '.3g')} -> {verdict} ({g['how']})")
    if quick:
        print("(--quick: CPU and tiny models; the goals are for a GPU and the 7B shape)")
    print("\nBENCHMARKS.md rows (GPU section):")
    print("\n".join(markdown_rows(steps, doc)))


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    steps = plan(args.quick)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {s.name for s in steps}
        if unknown:
            raise SystemExit(f"gpu_check: unknown step(s) {', '.join(sorted(unknown))}; see --list")
        steps = [s for s in steps if s.name in names]
    if args.list:
        for s in steps:
            what = " ".join(["python", *s.argv]) if s.kind != "check" else "python -c SHAPES_CHECK"
            print(f"{s.name:<28}{s.expected_s:>6.0f} s  " + (f"skipped: {s.reason}" if s.status == "skipped" else what))
        return 0
    out = Path(args.out or ROOT / "runs" / ("gpu-check-quick" if args.quick else "gpu-check"))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, interrupt)
    env, blocked = preflight(args.quick)
    print(f"gpu_check: {env['mode']} on {env['host']} ({env['device']}), torch {env['torch']}, transformers "
          f"{env['transformers']}; limit {args.budget:.0f} s; results in {out}", flush=True)
    try:
        run_plan(steps, out, env, blocked, args, started)
    except KeyboardInterrupt:       # between two steps: what finished is in the summary
        print("gpu_check: interrupted", flush=True)
    report(steps, write_summary(out, env, steps, args.budget, started), args.quick)
    print(f"summary: {out / 'summary.json'}; {time.monotonic() - started:.0f} s in all")
    bad = [s.name for s in steps if s.status in ("failed", "timeout")
           or (s.status == "skipped" and s.name not in LATER and not s.reason.startswith("quick mode"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
