"""analysis.cells: forgetting per 2x2 cell (image-ID/OOD x text-ID/OOD relative to each stage's tuned task),
on a hand-made run with an effect planted in each cell."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import analyze, cell_summary, forgetting_by_cell, load_run, write
from analysis.cells import CELLS, cell_of
from analysis.tables import TableError

from .synthetic import write_run

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {  # two tuned tasks; each benchmark's (image, text) domain
    "count": {"image": "shapes", "text": "count"},
    "clock": {"image": "clocks", "text": "time"},
    "colour": {"image": "shapes", "text": "attribute"},      # count: image-ID/text-OOD; clock: OOD/OOD
    "count_birds": {"image": "birds", "text": "count"},      # count: image-OOD/text-ID; clock: OOD/OOD
    "species": {"image": "birds", "text": "species"},        # OOD/OOD for both
    "hands": {"image": "clocks", "text": "hands"},           # count: OOD/OOD; clock: image-ID/text-OOD
}


def planted(tmp_path, domains=DOMAINS) -> Path:
    A = pd.DataFrame({  # stage 0 base, 1 tunes count, 2 tunes clock
        "count": [20, 80, 70], "clock": [10, 12, 90], "colour": [60, 40, 45], "count_birds": [30, 36, 30],
        "species": [50, 49, 47], "hands": [40, 40, 20],
    }, dtype=float)
    splits = {"count": "target", "clock": "target", **{b: "heldout" for b in A.columns[2:]}}
    run = write_run(tmp_path / "run", "sa_proj+hybrid", ["count", "clock"], A, splits)
    man = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(man | ({"domains": domains} if domains is not None else {})))
    return run


def test_cell_of():
    t = {"image": "a", "text": "x"}
    assert [cell_of(b, t) for b in ({"image": "a", "text": "x"}, {"image": "a", "text": "y"},
                                    {"image": "b", "text": "x"}, {"image": "b", "text": "y"})] == list(CELLS)


def test_forgetting_per_cell_recovers_the_planted_changes(tmp_path):
    table = forgetting_by_cell(load_run(planted(tmp_path), probes=False))
    got = {(r.stage, r.cell): (r.benchmarks, r.change_prev, r.change_base) for r in table.itertuples()}
    assert got == {
        (1, "image-ID/text-ID"): ("count", 60.0, 60.0),
        (1, "image-ID/text-OOD"): ("colour", -20.0, -20.0),
        (1, "image-OOD/text-ID"): ("count_birds", 6.0, 6.0),
        (1, "image-OOD/text-OOD"): ("clock,hands,species", (2 - 1 + 0) / 3, (2 - 1 + 0) / 3),
        (2, "image-ID/text-ID"): ("clock", 78.0, 80.0),
        (2, "image-ID/text-OOD"): ("hands", -20.0, -20.0),
        (2, "image-OOD/text-OOD"): ("colour,count,count_birds,species", (-10 + 5 - 6 - 2) / 4,
                                    (50 - 15 + 0 - 3) / 4),
    }
    assert set(table["recipe"]) == {"sa_proj+hybrid"} and list(table["task"].unique()) == ["count", "clock"]
    s = cell_summary(table).set_index("cell")
    assert list(s.index) == list(CELLS)
    assert s.loc["image-ID/text-OOD", "mean_change_prev"] == -20.0 and s.loc["image-ID/text-OOD", "stages"] == 2
    assert s.loc["image-OOD/text-ID", "stages"] == 1 and s.loc["image-OOD/text-ID", "final_change_base"] == 6.0


def test_untagged_benchmarks_and_stages_are_left_out_with_a_warning(tmp_path):
    domains = {k: v for k, v in DOMAINS.items() if k not in ("species", "clock")}
    with pytest.warns(UserWarning) as caught:
        table = forgetting_by_cell(load_run(planted(tmp_path, domains), probes=False))
    text = " ".join(str(w.message) for w in caught)
    assert "['clock', 'species'] have no 2x2 tags" in text and "stage 2 tunes 'clock'" in text
    assert set(table["stage"]) == {1} and "species" not in ",".join(table["benchmarks"])


def test_a_run_without_tags_is_a_clear_error_and_analysis_still_runs(tmp_path):
    run = planted(tmp_path, domains=None)
    with pytest.raises(TableError, match='no "domains"'):
        forgetting_by_cell(load_run(run, probes=False))
    an = analyze([run], n_boot=10, n_perm=10, probes=False)
    assert an.cells.empty


def test_analysis_writes_cells_csv(tmp_path):
    run = planted(tmp_path)
    an = analyze([run], n_boot=10, n_perm=10, probes=False)
    written = write(an, tmp_path / "out")
    assert tmp_path / "out" / "cells.csv" in written
    assert len(pd.read_csv(tmp_path / "out" / "cells.csv")) == 7


def test_analysis_run_prints_the_cells(tmp_path, capsys):
    from analysis.run import main
    assert main(["--run-dir", str(planted(tmp_path)), "--no-probes", "--n-boot", "10", "--n-perm", "10",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "forgetting per 2x2 cell" in out and "image-ID/text-OOD" in out and "-20.00" in out


def test_analysis_cells_imports_no_model_code():
    code = "import sys, analysis.cells; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
