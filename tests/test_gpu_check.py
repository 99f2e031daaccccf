"""scripts/gpu_check.py (`make gpu-check`): its plan, time limits and summary, and its cheapest real step
(the GPU tests' selection: on a CPU every one is collected and skipped)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gc = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)   # dataclasses look it up
_spec.loader.exec_module(gc)


def test_the_gpu_plan_measures_the_goal_shape_first_and_compiles_last():
    steps = gc.plan(quick=False)
    names = [s.name for s in steps]
    assert names[:6] == ["tests", "qwen2_5_vl_7b", "qwen2_5_vl_7b-mem", "qwen2_5_vl_7b-profile",
                         "llava_onevision_7b", "llava_next_8b"]
    assert names[6:9] == [f"{s}-compile" for s in gc.SHAPES]
    qwen3 = next(s for s in steps if s.name == "qwen3_vl_8b")
    assert qwen3.status == "skipped" and "any-model" in qwen3.reason
    for s in (s for s in steps[1:9] if s.kind == "bench"):
        assert s.argv[:4] == ["-m", "probes.bench", "--shape", s.name.split("-")[0]]
        assert ("--compile" in s.argv) == s.name.endswith("-compile")
        assert s.argv[s.argv.index("--max-new-tokens") + 1] == "256"
    tests = steps[0].argv
    assert tests[tests.index("-m", 2) + 1] == "gpu" and "tests/test_probe_gpu_paths.py" in tests
    assert sum(s.expected_s for s in steps[:6]) < 480      # all but the compiled runs fit the default limit


def test_quick_plan_checks_the_shapes_and_compiles_one_tiny_model():
    steps = {s.name: s for s in gc.plan(quick=True)}
    assert "--quick" in steps["qwen2_5_vl_7b"].argv and "--shape" not in steps["qwen2_5_vl_7b"].argv
    assert steps["shapes"].kind == "check"
    assert steps["qwen2_5_vl_7b-compile"].status == "pending"
    assert steps["llava_next_8b-compile"].status == "skipped"


def test_a_step_gets_at_most_a_few_times_its_expected_seconds_and_none_when_too_little_is_left():
    step = gc.Step("x", "bench", [], expected_s=100)
    assert gc.step_timeout(step, 1000) == gc.TIMEOUT_FACTOR * 100
    assert gc.step_timeout(step, 120) == 120
    assert gc.step_timeout(step, 40) is None


def test_a_step_past_its_timeout_is_killed_and_reported(tmp_path):
    step = gc.Step("sleeper", "bench", ["-c", "import time; time.sleep(60)"], expected_s=1)
    gc.run_step(step, tmp_path, timeout=1, python=sys.executable)
    assert step.status == "timeout" and step.rc is None and step.seconds < 30
    assert (tmp_path / "sleeper.log").is_file()


def _bench_result(captions, tf_extra, gen_extra, tf_rate=500.0, mfu=0.3, cache=0.5):
    methods = {k: dict(pairs_per_s=r, mfu=mfu, peak_mem_bytes=2**34, peak_extra_bytes=e)
               for k, r, e in (("study", 5.0, 1), ("naive", 50.0, 1), ("tf_engine", tf_rate, tf_extra),
                               ("gen_engine", 60.0, gen_extra))}
    return dict(captions=captions, methods=methods, cache=dict(ratio=cache),
                agreement=dict(gen_identical=3, gen_compared=3),
                ratios=dict(tf_vs_study=tf_rate / 5, gen_vs_study=12.0, tf_vs_naive=tf_rate / 50))


def test_goals_and_summary_come_from_the_goal_shapes_json():
    main = gc.Step("qwen2_5_vl_7b", "bench", [], 1, "ok", result=_bench_result(192, 2**30, 3 * 2**30))
    few = gc.Step("qwen2_5_vl_7b-mem", "bench", [], 1, "ok", result=_bench_result(64, 2**30, 2**30))
    late = gc.Step("llava_next_8b-compile", "bench", [], 1, "skipped", reason="out of time")
    met = {g["goal"]: g["met"] for g in gc.goals([main, few, late])}
    assert met["teacher-forced engine >= 50x the study probe"] is True          # 500 / 5 = 100x
    assert met[">= 40% MFU, teacher-forced engine"] is False                     # 30%
    assert met["generation engine >= 10x the study probe"] is True
    assert met["second checkpoint (LM-only) <= 60% of the first"] is True
    assert met["peak memory flat in captions, teacher-forced engine"] is True
    assert met["peak memory flat in captions, generation engine"] is False      # 3x from 64 to 192 captions
    table = gc.summary_table([main, few, late])
    assert "100.0" in table and "[out of time]" in table and "30.0" in table    # ratio, reason, MFU in %


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this step runs the GPU tests themselves")
def test_quick_mode_runs_its_tests_step_and_writes_json(tmp_path, capsys):
    assert gc.main(["--quick", "--only", "tests", "--out", str(tmp_path)]) == 0
    tests = json.loads((tmp_path / "tests.json").read_text())
    assert tests["skipped"] >= 7 and tests["failed"] == tests["errors"] == 0     # collected, then skipped
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok"] and summary["env"]["cuda"] is False
    assert "7 skipped" in capsys.readouterr().out
