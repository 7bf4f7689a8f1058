"""The package layout: no import cycles between kvdrive's modules (lazy imports inside
functions count too), no package of more than 15 modules, every package declares its surface."""

import ast
from pathlib import Path

import kvdrive

ROOT = Path(kvdrive.__file__).parent
MAX_MODULES = 15


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the kvdrive modules it imports anywhere in its body. ``from P import x`` is an
    edge to the submodule ``P.x`` where there is one, else to ``P``."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules and node.level == 0:
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    edges.add(sub if sub in modules else node.module)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_eval_does_not_import_bench():
    """The benchmarks read the evaluation's text corpus (``bench decode --text``); the evaluation
    needs nothing of the benchmarks (results are written by ``kvdrive.results``)."""
    graph = import_graph()
    crossing = {
        (m, d)
        for m, deps in graph.items()
        if m.startswith("kvdrive.eval")
        for d in deps
        if d.startswith("kvdrive.bench")
    }
    assert not crossing, crossing
    from_bench = {
        d for m, deps in graph.items() if m.startswith("kvdrive.bench") for d in deps if d.startswith("kvdrive.eval")
    }
    assert from_bench <= {"kvdrive.eval.corpus"}, from_bench


def test_no_package_holds_more_than_15_modules():
    for folder in [ROOT, *(p for p in ROOT.rglob("*") if p.is_dir() and (p / "__init__.py").exists())]:
        n = len(list(folder.glob("*.py")))
        assert n <= MAX_MODULES, f"{folder.relative_to(ROOT.parent)} holds {n} modules"


def test_every_package_declares_its_surface():
    for init in ROOT.rglob("__init__.py"):
        names = {
            t.id
            for node in ast.parse(init.read_text()).body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        assert "__all__" in names, f"{init.relative_to(ROOT.parent)} has no __all__"
