"""make demo's progress relay: a command's tqdm updates reach the demo's bar, its other lines its log."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import demo  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))


class Bar:
    def __init__(self):
        self.seen = []

    def set_postfix_str(self, text, refresh=True):
        self.seen.append((text, self.n, self.total))


def test_relay_splits_progress_from_log_lines():
    out = ("loading stage 1\n"
           "\rstage 1:   0%|          | 0/40 [00:00<?, ?it/s]"
           "\rstage 1:  45%|####5     | 18/40 [00:03<00:04, 5.1it/s]"
           "\rstage 1: 100%|##########| 40/40 [00:08<00:00, 5.0it/s]\n"
           "wrote stage-01-cub200 — done\n"
           "partial line without newline")
    r, w = os.pipe()
    data = out.encode()
    # split inside the multi-byte dash to check the incremental decoding
    cut = data.index("—".encode()) + 1
    os.write(w, data[:cut])
    os.write(w, data[cut:])
    os.close(w)
    log, bar = io.StringIO(), Bar()
    with os.fdopen(r, "rb") as pipe:
        demo._relay(pipe, log, bar)
    assert [(n, t) for _, n, t in bar.seen] == [(0, 40), (18, 40), (40, 40)]
    assert bar.seen[1][0] == "stage 1 [00:03<00:04, 5.1it/s]"  # the command's own time left and rate
    assert log.getvalue() == "loading stage 1\nwrote stage-01-cub200 — done\npartial line without newline"
