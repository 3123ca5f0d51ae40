"""The shape lint of `make lint`: file and function lengths, and import cycles, in a Python package.

Fails (exit status 1, one line per finding) when:

- a file is over `MAX_FILE_LINES` lines;
- a function or method (nested ones too) is over `MAX_FUNCTION_LINES` lines,
  counted from its `def` line to its last line, docstring included;
- modules of the package import each other in a cycle. Every import counts:
  module level, inside functions and inside `if TYPE_CHECKING:` blocks, since
  each one ties the two modules together for a reader even where Python would
  not notice. Importing `a.b.c` also runs the `__init__` of packages `a.b`:
  those count as imports of the packages too, except the importer's own
  enclosing packages (a package's `__init__` importing its own submodules is
  not a cycle a reader has to untangle).

It reads the source with `ast` only (stdlib, no imports of the package), so it
runs before anything is installed. Usage: `python tools/check_shape.py [PACKAGE_DIR]`
(default: the `kvengine` folder next to this script's folder).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    """One import statement of `source` that reaches module `target` of the same package."""

    source: str
    target: str
    path: Path
    line: int


def module_name(package_dir: Path, path: Path) -> str:
    """`kvengine/eval/runner.py` -> `kvengine.eval.runner`; a package's `__init__.py` is the package."""
    parts = [package_dir.name, *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def length_findings(path: Path, tree: ast.Module, num_lines: int) -> Iterator[str]:
    """Lines over the limits: the file's, then each function's, in source order."""
    if num_lines > MAX_FILE_LINES:
        yield f"{path}: {num_lines} lines (limit {MAX_FILE_LINES})"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield f"{path}:{node.lineno}: function {node.name} is {length} lines (limit {MAX_FUNCTION_LINES})"


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names (relative imports resolved against `module`)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(
    module: str, is_package: bool, tree: ast.Module, known: set[str]
) -> Iterator[tuple[str, int]]:
    """(module of the package, line) for every import anywhere in `tree`, `from a import b` naming `a.b`
    where `a.b` is a module, else `a`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                yield (child if child in known else base), node.lineno


def with_packages(module: str, target: str, package: str) -> list[str]:
    """`target` and the packages above it whose `__init__` importing it runs, less `module`'s own."""
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    parts = target.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if m != package and m not in own]


def import_graph(package_dir: Path, trees: dict[Path, ast.Module]) -> dict[str, list[Import]]:
    """Each module's imports of other modules of the package, with where they are written."""
    names = {path: module_name(package_dir, path) for path in trees}
    known = set(names.values())
    graph: dict[str, list[Import]] = {name: [] for name in known}
    for path, tree in trees.items():
        source = names[path]
        for target, line in imported_modules(source, path.name == "__init__.py", tree, known):
            if target.split(".")[0] != package_dir.name:
                continue
            for reached in with_packages(source, target, package_dir.name):
                if reached in known and reached != source:
                    graph[source].append(Import(source, reached, path, line))
    return graph


def strongly_connected(graph: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's components of more than one module (each one holds at least one cycle), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def shortest_cycle(graph: dict[str, list[Import]], component: list[str], start: str) -> list[Import]:
    """The imports of a shortest cycle through `start` within its component (breadth-first)."""
    inside = set(component)
    came_from: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target == start:
                    cycle = [edge]
                    while cycle[0].source != start:
                        cycle.insert(0, came_from[cycle[0].source])
                    return cycle
                if edge.target in inside and edge.target not in came_from:
                    came_from[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # a component of more than one module has one


def cycle_findings(graph: dict[str, list[Import]]) -> Iterator[str]:
    """One line per distinct cycle: a shortest one through each module of each component."""
    for component in strongly_connected(graph):
        seen: set[frozenset[Import]] = set()
        for start in component:
            cycle = shortest_cycle(graph, component, start)
            if frozenset(cycle) in seen:
                continue
            seen.add(frozenset(cycle))
            steps = "; ".join(f"{e.source} -> {e.target} ({e.path}:{e.line})" for e in cycle)
            yield f"import cycle: {steps}"


def check(package_dir: Path) -> list[str]:
    """Every finding for the package in `package_dir`, lengths first, then cycles."""
    findings: list[str] = []
    trees: dict[Path, ast.Module] = {}
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        trees[path] = ast.parse(text, filename=str(path))
        findings += length_findings(path, trees[path], len(text.splitlines()))
    return findings + list(cycle_findings(import_graph(package_dir, trees)))


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "kvengine"
    findings = check(package_dir)
    for finding in findings:
        print(finding)
    if findings:
        print(f"check_shape: {len(findings)} problem(s) in {package_dir}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
