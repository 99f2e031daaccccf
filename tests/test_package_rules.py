"""The package rules of docs/design.md, checked from the project's own imports (an AST walk, no import):
analysis never loads torch/transformers (not even through the project modules it imports); probes
imports from training only the shared model layer; training imports probes in at most the modules
that assemble the drift monitor; no file-level import circle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "probes", "analysis")
# The shared model layer: what probes may import from training (docs/design.md).
SHARED = ("training.families", "training.chat", "training.tokenizer", "training.records",
          "training.manifest", "training.checkpoints", "training.moe_layer", "training.dataset_files")
MONITOR_ASSEMBLY = {"training.run", "training.advise"}  # the only training modules that may import probes
HEAVY = ("torch", "transformers", "accelerate", "peft", "safetensors", "torchvision")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Every module name this file imports (absolute or relative), at any depth of the file."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods}
    return out


MODS = _modules()
EDGES = {m: _imports(m, p, MODS) for m, p in MODS.items()}


def _project(names) -> set[str]:
    return {n for n in names if n in MODS}


def _is_under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_probes_imports_only_the_shared_model_layer_from_training():
    bad = {m: sorted(n for n in _project(e) if n.startswith("training") and not _is_under(n, SHARED))
           for m, e in EDGES.items() if m.startswith("probes")}
    assert not {m: v for m, v in bad.items() if v}


def test_probes_never_imports_analysis():
    bad = {m: sorted(n for n in _project(e) if n.startswith("analysis")) for m, e in EDGES.items()
           if m.startswith("probes")}
    assert not {m: v for m, v in bad.items() if v}


def test_shared_layer_imports_nothing_above_it():
    bad = {m: sorted(n for n in _project(e) if not _is_under(n, SHARED) and n != "training")
           for m, e in EDGES.items() if _is_under(m, SHARED)}
    assert not {m: v for m, v in bad.items() if v}


def test_training_imports_probes_only_where_the_monitor_is_assembled():
    users = {m for m, e in EDGES.items() if m.startswith("training") and any(n.startswith("probes") for n in e)}
    assert users <= MONITOR_ASSEMBLY, users


def test_analysis_never_reaches_torch_even_through_project_modules():
    seen, todo = set(), [m for m in MODS if m.startswith("analysis")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        heavy = sorted(n for n in EDGES[m] if _is_under(n, HEAVY))
        assert not heavy, f"{m} imports {heavy} (reached from analysis)"
        todo += list(_project(EDGES[m]))


def test_analysis_loads_no_torch_at_run_time():
    code = ("import sys, importlib, pkgutil, analysis\n"
            "for m in pkgutil.walk_packages(analysis.__path__, 'analysis.'): importlib.import_module(m.name)\n"
            "bad = [k for k in ('torch', 'transformers') if k in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_file_level_import_circle():
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in _project(EDGES[v]) - {v}:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in MODS:
        if v not in index:
            visit(v)
    assert not cycles
