"""The package's layout, read from its own source: data flows one way.

- no import circle between m3i's files (every import counts, also one inside a function or under
  TYPE_CHECKING: each ties two files together);
- the library (everything but ``train/`` and ``cli.py``) never imports the trainer;
- no function longer than ``MAX_LINES`` lines.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "m3i"
MAX_LINES = 60
# functions allowed to be longer, each with the reason (none today)
LONG: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_files(path: Path, files: dict[str, Path]) -> set[Path]:
    """The files of m3i that ``path`` imports, each named by the longest module name that is a file."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            names = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and files[name] != path:
                out.add(files[name])
    return out


def import_graph() -> dict[Path, set[Path]]:
    files = {module_name(p): p for p in SRC.rglob("*.py")}
    return {p: imported_files(p, files) for p in files.values()}


def circles(graph: dict[Path, set[Path]]) -> list[list[Path]]:
    """The strongly connected groups of more than one file (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checks_find_what_they_look_for(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    graph = {a: {b}, b: {c}, c: {a}}
    assert sorted(map(sorted, circles(graph))) == [sorted([a, b, c])]
    assert circles({a: {b}, b: {c}, c: set()}) == []


def test_no_import_circle():
    found = [sorted(str(p.relative_to(SRC)) for p in group) for group in circles(import_graph())]
    assert found == []


def test_the_library_never_imports_the_trainer():
    trainer = SRC / "train"
    up = [f"{p.relative_to(SRC)} -> {q.relative_to(SRC)}" for p, targets in import_graph().items()
          if trainer not in p.parents and p.name != "cli.py" for q in targets if trainer in q.parents]
    assert up == []


def long_functions() -> dict[str, int]:
    out = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    out[f"{path.relative_to(SRC)}:{node.name}"] = lines
    return out


def test_no_function_is_long_but_those_named_with_their_reason():
    # equal, not a subset: a named function that got shorter leaves the list too
    assert set(long_functions()) == set(LONG), long_functions()
