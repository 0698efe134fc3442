"""The layout rules of README's Architecture section, checked on the source (no module is imported).

- no import cycle among the modules of featcache/ and heads/, counting imports inside functions;
- featcache never imports heads; heads never imports transformers, open_clip or timm (backbones live in
  featcache, heads see their features); heads.fusions and heads.data never import heads.train or
  heads.report; heads.report reads run directories only (no heads.train, heads.data, heads.fusions);
- a module stays small enough to read (about 350 lines) and so does a function (about 60).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("featcache", "heads")
MAX_MODULE_LINES = 375
MAX_FUNCTION_LINES = 70


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """Every module this one imports, at the top or inside functions (project modules resolved precisely)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES)
    return found


def project_graph() -> dict[str, set[str]]:
    graph = {}
    for m in MODULES:
        deps = set()
        for imp in imports_of(m):
            while imp and imp not in MODULES:  # `featcache.cache.store.CacheError` -> featcache.cache.store
                imp = imp.rpartition(".")[0]
            if imp and imp != m:
                deps.add(imp)
        graph[m] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(project_graph())
    assert not found, "import cycles (function-level imports counted):\n" + "\n".join(" <-> ".join(c)
                                                                                    for c in found)


FORBIDDEN = [  # (importer prefix, imported prefix, why)
    ("featcache", "heads", "featcache stores what backbones produce and knows nothing of heads"),
    ("heads", "transformers", "heads see backbones only through featcache"),
    ("heads", "open_clip", "heads see backbones only through featcache"),
    ("heads", "timm", "heads see backbones only through featcache"),
    ("heads.fusions", "heads.train", "a head is a model, not a training loop"),
    ("heads.fusions", "heads.report", "a head is a model, not a report"),
    ("heads.data", "heads.train", "data loading knows nothing of training"),
    ("heads.data", "heads.report", "data loading knows nothing of reports"),
    ("heads.report", "heads.train", "reports read run directories only"),
    ("heads.report", "heads.data", "reports read run directories only"),
    ("heads.report", "heads.fusions", "reports read run directories only"),
]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("importer,imported,why", FORBIDDEN)
def test_forbidden_import_directions(importer, imported, why):
    bad = sorted(f"{m} imports {i}" for m in MODULES if _under(m, importer)
                 for i in imports_of(m) if _under(i, imported))
    assert not bad, f"{why}:\n" + "\n".join(bad)


def test_modules_and_functions_stay_small():
    too_long = []
    for m, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}(): {n} lines")
    assert not too_long, "\n".join(too_long)


def _group_has_comment(lines: list[str], lineno: int) -> bool:
    """Whether the import at `lineno` (1-based), or the run of imports it belongs to, or the line just above
    that run, carries a comment (the reason it is imported inside a function)."""
    i = lineno - 1
    while i > 0 and lines[i - 1].strip().startswith(("import ", "from ")) and "#" not in lines[i]:
        i -= 1  # up to the first import of the run
    run = range(i, lineno)
    return any("#" in lines[k] for k in run) or (i > 0 and lines[i - 1].strip().startswith("#"))


def test_imports_inside_functions_say_why():
    """Imports go at the top of a module; one inside a function is heavy and optional, and says so."""
    silent = []
    for m, path in MODULES.items():
        text = path.read_text()
        lines = text.split("\n")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)) and not _group_has_comment(lines, sub.lineno):
                        silent.append(f"{path.relative_to(ROOT)}:{sub.lineno}: {lines[sub.lineno - 1].strip()}")
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(silent)
