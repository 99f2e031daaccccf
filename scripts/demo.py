"""`make demo`: the whole study on the embedded world, on a CPU, end to end.

    world + base model (built once, cached)
    -> for each run: training.run (5 stages, drift monitor on)
                     -> probes.run (number-token probe, KL to base, task signatures; both modes)
                     -> probes.run --profile study (the study script's probe, to RUN/probes_study.parquet)
                     -> probes.evaluate (targets + held-out) -> probes.layers (SA vs MLP write-back)
    -> analysis.run and analysis.drift_report over all runs -> a table per run and the figures' paths

Every step is one of the toolkit's own commands, run as a subprocess (one run's chain per worker, one
torch thread each: two workers fill two cores). Each command resumes, so a second `make demo` reuses what
is done and only redoes the analysis. `--runs` picks runs by name (RECIPES, BASELINES and MORE below);
`--no-baselines` runs the paper's recipes only.
"""
from __future__ import annotations

import argparse
import codecs
import json
import os
import queue
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the toolkit's packages live at the repository root
# run name -> training.run arguments. The paper's recipes first, then the baselines (docs/baselines.md).
RECIPES = {name: ["--recipe", name] for name in ["full", "llm", "mlp", "mlp_gate_up", "sa_proj"]}
# The default runs stop there (the first `make demo` within 15 minutes on 2 cores: docs/demo.md); the
# other baselines run when named in --runs.
BASELINES = {"sa_proj+hybrid": ["--recipe", "sa_proj", "mix.share=0.25"]}
MORE = {"lora": ["--recipe", "lora"], "lwf": ["--recipe", "lwf"], "wise_ft": ["--recipe", "wise_ft"],
        "moe": ["--recipe", "moe"], "sa_proj+lowlr": ["--recipe", "sa_proj", "train.lr=3e-5", "tag=lowlr"]}
ALL = {**RECIPES, **BASELINES, **MORE}
COUNTING_TASK = "pixmocount"
STUDY_TABLE = "probes_study.parquet"   # its own table: the analysis reads probes.parquet as before


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# A tqdm update as the toolkit's commands print it: "desc:  45%|####  | 45/100 [00:10<00:12, 4.5it/s]".
PROGRESS = re.compile(r"(?P<desc>[^\r\n]*?):\s*\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<times>[^\]]*)\]")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SLOTS: queue.Queue = queue.Queue()  # terminal lines for the progress bars of the chains running at once


def _relay(pipe, log, bar) -> None:
    """Copy a command's output into its log, line by line; its progress updates (tqdm's carriage-return
    rewrites) go to this demo's bar instead, so the terminal shows steps done, rate and time left."""
    pending, decode = "", codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    for chunk in iter(lambda: decode(os.read(pipe.fileno(), 1 << 14)), ""):
        pending += chunk
        *parts, pending = re.split(r"(\r|\n)", pending)
        for text, sep in zip(parts[::2], parts[1::2]):
            m = PROGRESS.search(text)
            if m:
                bar.total, bar.n = int(m["total"]), int(m["n"])  # the command's own count, time left and rate
                bar.set_postfix_str(f"{m['desc'].strip()[-24:]} [{m['times']}]", refresh=True)
            elif sep == "\n" and (ANSI.sub("", text).strip() or not ANSI.search(text)):  # not a bar's erasure
                log.write(text + "\n")
    if pending:
        log.write(pending)


def step(cmd: list[str], log: Path, label: str) -> float:
    """Run one toolkit command, its output to `log` and its progress to a bar on the terminal; stop the
    demo with the log's tail if it fails."""
    t0 = time.time()
    slot = SLOTS.get()
    bar = tqdm(desc=f"  {label}", position=slot, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None,
               bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n}/{total}{postfix}")
    try:
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())
            _relay(proc.stdout, f, bar)
            rc = proc.wait()
    finally:
        bar.close()
        SLOTS.put(slot)
    dt = time.time() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"demo: {label} failed (exit {rc}); last lines of {log}:\n{tail}")
    tqdm.write(f"  {label:<40s} {dt:6.1f} s")
    return dt


def chain(name: str, train_args: list[str], out: Path, args) -> None:
    """Train one run over the five stages, then probe, evaluate and attribute every checkpoint."""
    py, run, log = sys.executable, out / name, out / "logs" / f"{name}.log"
    step([py, "-m", "training.run", "--config", args.config, *train_args, "--out", str(run),
          f"monitor.every={args.monitor_every}"], log, f"{name}: training.run")
    step([py, "-m", "probes.run", "--ckpt-dir", str(run), "--num-samples", str(args.captions), "--mode", "both",
          "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "32", "--drift", "--signatures"],
         log, f"{name}: probes.run")
    step([py, "-m", "probes.run", "--ckpt-dir", str(run), "--profile", "study", "--num-samples", str(min(args.study_captions, args.captions)),
          "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "32", "--out", str(run / STUDY_TABLE)],
         log, f"{name}: probes.run --profile study")
    step([py, "-m", "probes.evaluate", "--ckpt-dir", str(run), "--limit", str(args.eval_limit),
          "--batch-size", "64"], log, f"{name}: probes.evaluate")
    step([py, "-m", "probes.layers", "--ckpt-dir", str(run), "--num-samples", str(args.layer_captions),
          "--batch-size", "32"], log, f"{name}: probes.layers")
    if not (run / "monitor_cost.json").is_file():
        step([py, "-m", "probes.monitor_cost", "--ckpt-dir", str(run), "--limit", str(args.eval_limit)],
             log, f"{name}: probes.monitor_cost")


def results_table(out: Path, names: list[str]):
    """The demo's answer: per run, what it learned, what it forgot, how far the probe moved, rho."""
    import pandas as pd

    summary = pd.read_csv(out / "analysis" / "summary.csv").set_index("run")
    metrics = pd.read_csv(out / "analysis" / "metrics.csv")
    rows = []
    for name in names:
        change = metrics[(metrics.run == name) & (metrics.metric == "heldout_change")].set_index("stage")["value"]
        probes = pd.read_parquet(out / name / "probes.parquet")
        tf = probes[probes["mode"] == "teacher-forced"]
        mass = tf[tf.probe == "number_mass"].set_index("stage")
        kl = tf[tf.probe == "kl_to_base"].set_index("stage")["mean"]
        study = pd.read_parquet(out / name / STUDY_TABLE)
        study = study[study.probe == "avg_total_number_prob"].set_index("stage")["mean"]
        count = int(mass[mass.task == COUNTING_TASK].index[0])
        s = summary.loc[name]
        rows.append({
            "run": name,
            "learning": s.get("target_learning_mean"),
            "held-out @count": change.loc[count],
            "held-out mean": change.iloc[1:].mean(),
            "held-out final": change.iloc[-1],
            "recoveries": s.get("recovery_events"),
            "number_mass x base @count": mass.loc[count, "mean"] / mass.loc[0, "mean"],
            "study x base @count": study.loc[count] / study.loc[0],
            "KL @count": kl.get(count, float("nan")),
            "rho": s.get("recipe_spearman"),
        })
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", help=f"comma-separated run names, of {', '.join(ALL)} "
                    f"(default: {', '.join({**RECIPES, **BASELINES})})")
    ap.add_argument("--no-baselines", action="store_true", help="only the paper's recipes")
    ap.add_argument("--config", default="toy", help="training config (training/configs/NAME.yaml)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--captions", type=int, default=256, help="caption samples per probe")
    ap.add_argument("--study-captions", type=int, default=32,
                    help="caption samples of the study's own probe (greedy generation, the costlier probe; at most --captions)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generation-mode probe length (a world caption "
                    "is under 20 tokens)")
    ap.add_argument("--eval-limit", type=int, default=100, help="test records per benchmark")
    ap.add_argument("--layer-captions", type=int, default=64, help="caption samples of probes.layers")
    ap.add_argument("--monitor-every", type=int, default=12,
                    help="drift monitor: optimizer steps between checks (12: under 10%% of a stage's 126, where "
                    "training.advise's trials stop; docs/advise.md)")
    args = ap.parse_args(argv)
    known = {**RECIPES, **({} if args.no_baselines else BASELINES)}
    names = [r for r in args.runs.split(",") if r] if args.runs else list(known)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        ap.error(f"--runs: unknown run(s) {unknown}; known: {', '.join(ALL)}")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for slot in range(max(args.workers, 1)):
        SLOTS.put(slot)
    t0 = time.time()

    from training.config import load_config
    base = load_config(args.config, [])["base"]
    if not str(base).startswith("world:"):
        raise SystemExit(f"demo: config {args.config!r} has base {base!r}; the demo runs on the embedded world "
                         "(base: world:FAMILY:SIZE)")
    print("demo: embedded world and base model (built once, then cached)", flush=True)
    step([sys.executable, "-m", "training.world", "--base", base.split(":", 1)[1]], out / "logs" / "base.log",
         "world + base model")
    print((out / "logs" / "base.log").read_text().split("base model: ")[-1].rstrip(), flush=True)

    from training.manifest import library_versions
    libraries = library_versions()           # also in every run's run.json
    (out / "libraries.json").write_text(json.dumps(libraries, indent=1) + "\n")
    print("demo: libraries " + ", ".join(f"{k} {v}" for k, v in libraries.items()), flush=True)
    print(f"demo: {len(names)} runs x 5 stages, {args.workers} at a time (logs in {out / 'logs'})", flush=True)
    with ThreadPoolExecutor(args.workers) as pool:
        for f in [pool.submit(chain, n, ALL[n], out, args) for n in names]:
            f.result()

    print("demo: analysis", flush=True)
    run_dirs = sum((["--run-dir", str(out / n)] for n in names), [])
    step([sys.executable, "-m", "analysis.run", *run_dirs, "--out", str(out / "analysis")],
         out / "logs" / "analysis.log", "analysis.run")
    step([sys.executable, "-m", "analysis.drift_report", *run_dirs, "--out", str(out / "analysis")],
         out / "logs" / "analysis.log", "analysis.drift_report")

    import pandas as pd
    table = results_table(out, names)
    table.to_csv(out / "analysis" / "demo_table.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:+.3g}".format):
        print("\nPer run, in percentage points (pp) of the mean score. learning: mean gain of each target at its own "
              "stage;\nheld-out: mean held-out score minus the base's (negative = forgetting) after the counting stage "
              "(@count),\naveraged over stages 1-5 (mean) and at the end (final); number_mass x base and KL to the base "
              "after the\ncounting stage; study x base: the same ratio for the study script's probe "
              "(avg_total_number_prob,\nprobes.run --profile study); rho: Spearman of the number_mass shift vs the "
              "held-out change over stages.")
        print(table.to_string(index=False))
    print("\nFigures:")
    for p in sorted((out / "analysis").rglob("*.png")):
        print(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}")
    print(f"\ndemo: done in {time.time() - t0:.0f} s; tables in {out}/RUN/{{probes,evals,layers,monitor}}.parquet; "
          f"analysis in {out / 'analysis'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
