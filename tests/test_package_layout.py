"""The package's shape: no import cycle, no import up the layers, the CLI on the top floor only, no
model names compared outside recipes and registries."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rayrec"


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports (any import statement, also inside functions)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in files:  # `from pkg import name`: the deepest module named
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not a cycle
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycle_in_rayrec():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_driver_code_compares_no_model_names():
    """Which recipe or hook a job gets is looked up in registries (``rayrec.recipes``, ``rayrec.models``,
    ``rayrec.train.specs.MODEL_SPECS``), never decided by comparing ``model.name`` in driver code."""
    pattern = re.compile(r"model\.name\s*[!=]=|\bname\s*[!=]=\s*[\"'](ur4rec|sasrec|popularity)[\"']")
    allowed = {ROOT / "config"}  # schema validators may check their own variant
    hits = [f"{p.relative_to(ROOT.parent)}:{i}: {line.strip()}"
            for p in ROOT.rglob("*.py") if not any(a in p.parents for a in allowed)
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


#: The floors of ``rayrec`` (ARCHITECTURE.md): a module imports only from its own floor or below.
#: ``cli`` -> {``runs``/``recipes``, ``tune``, ``submit``} -> ``workers`` -> {``train``, ``genrec``}
#: -> ``prefs`` -> {``models``, ``strategies``, ``data``, ``eval``, ``tracking``, ``cluster``} -> ``config``
#: -> the leaves (``errors``, ``secrets``, ``console``).
FLOORS: dict[str, int] = {
    "cli": 7, "__main__": 7,
    "runs": 6, "recipes": 6, "tune": 6, "submit": 6, "recs": 6,
    "workers": 5,
    "train": 4, "genrec": 4,
    "prefs": 3,
    "models": 2, "strategies": 2, "data": 2, "eval": 2, "tracking": 2, "cluster": 2,
    "config": 1,
    "errors": 0, "secrets": 0, "console": 0, "stopping": 0, "run_lock": 0, "storage": 0, "": 0,
}


def top_part(module: str) -> str:
    """``rayrec.train.loop`` -> ``train``; ``rayrec`` -> ``""``."""
    return module.split(".")[1] if "." in module else ""


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int] = FLOORS) -> list[str]:
    """``a -> b`` for every import of a module on a higher floor (a part missing from ``floors`` is
    an error too: a new top-level module must be given its floor)."""
    out = []
    for mod, targets in sorted(graph.items()):
        for t in sorted(targets):
            a, b = top_part(mod), top_part(t)
            if a not in floors or b not in floors:
                out.append(f"{mod} -> {t} (no floor for {a if a not in floors else b}: add it to FLOORS)")
            elif a != b and floors[b] > floors[a]:
                out.append(f"{mod} -> {t}")
    return out


def test_the_layer_check_finds_an_upward_import():
    graph = {"rayrec.train.loop": {"rayrec.recipes.sequential", "rayrec.models.sasrec"},
             "rayrec.models.sasrec": {"rayrec.config.schema"}, "rayrec.recipes.sequential": set(),
             "rayrec.config.schema": set(), "rayrec.newthing": set()}
    found = upward_imports(graph)
    assert "rayrec.train.loop -> rayrec.recipes.sequential" in found
    assert not any(f.startswith("rayrec.models.sasrec") for f in found)
    assert upward_imports({"rayrec.newthing": {"rayrec.config"}, "rayrec.config": set()}) == [
        "rayrec.newthing -> rayrec.config (no floor for newthing: add it to FLOORS)"]


def test_no_import_runs_up_the_layers():
    found = upward_imports(import_graph())
    assert not found, "imports up the layers:\n" + "\n".join(found)


def test_command_line_code_lives_in_rayrec_cli_only():
    """Library folders hold no ``cli.py`` (nor ``*_cli.py``): the commands are ``rayrec/cli/``'s."""
    stray = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
             if (p.name == "cli.py" or p.stem.endswith("_cli")) and ROOT / "cli" not in p.parents]
    assert not stray, f"command-line modules outside rayrec/cli: {stray}"


def test_readme_layout_table_matches_the_tree():
    """Every path the README's layout table names exists, and every folder and module at the top of
    ``rayrec/`` is named there (so the table is updated with the tree)."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(rayrec/[\w/.]*)`", table))
    missing = sorted(n for n in named if not (ROOT.parent / n).exists())
    assert not missing, f"README layout names paths that do not exist: {missing}"
    top = {f"rayrec/{p.name}/" if p.is_dir() else f"rayrec/{p.name}" for p in ROOT.iterdir()
           if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    unnamed = sorted(top - named)
    assert not unnamed, f"README layout does not name: {unnamed}"
