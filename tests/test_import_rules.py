"""The house's rules, checked on the source (docs/README.md, ../shared/STYLE.md):
  * shared/ imports neither client/, server/, simulation/ nor fedrec/;
  * client/ and server/ never import each other: what crosses is a record of shared/protocol.py;
  * no import cycle between any two of the project's modules (deferred imports count too).
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "simulation", "fedrec")
FORBIDDEN = {"shared": ("client", "server", "simulation", "fedrec"), "client": ("server", "simulation", "fedrec"),
             "server": ("client", "simulation", "fedrec")}


def module_name(root: Path, path: Path) -> str:
    """The name it imports as: shared/protocol.py is fedrec.shared.protocol (pyproject.toml's package-dir)."""
    parts = path.relative_to(root).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "fedrec" else ("fedrec",) + parts)


def package(module: str) -> str:
    """fedrec.shared.protocol -> shared; fedrec.cli -> fedrec."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES else "fedrec"


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its body."""
    files = {module_name(root, p): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import mod` imports the module pkg.mod when there is one.
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name and not files[t].name == "__init__.py"}
    return graph


def rule_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        banned = FORBIDDEN.get(package(module), ())
        out += [f"{module} imports {t}" for t in sorted(targets) if package(t) in banned]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_shared_is_pure_and_client_and_server_never_import_each_other():
    assert rule_violations(import_graph(ROOT)) == []


def test_no_import_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_the_checks_see_what_they_are_meant_to():
    graph = {"fedrec.server.a": {"fedrec.client.b"}, "fedrec.client.b": {"fedrec.shared.c"},
             "fedrec.shared.c": {"fedrec.server.a"}, "fedrec.shared.d": set()}
    assert rule_violations(graph) == ["fedrec.server.a imports fedrec.client.b", "fedrec.shared.c imports fedrec.server.a"]
    assert cycles(graph) == [["fedrec.client.b", "fedrec.server.a", "fedrec.shared.c"]]
    assert "fedrec.server.federation" in import_graph(ROOT)["fedrec.server.app"]


def test_no_function_outside_tests_is_longer_than_60_lines():
    long = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []
