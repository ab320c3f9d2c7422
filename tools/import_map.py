"""Print every import edge between the top-level parts of the project and fail on one
that runs against the layers (docs/ARCHITECTURE.md), or on a circle of module imports.

    .venv/bin/python tools/import_map.py [--modules]

Reads the source only (``ast``), never imports it. An edge counts every ``import`` and
``from ... import`` of one of our modules, at any depth of the file (a function-level
import is still a dependency). ``--modules`` also prints the module-level edges.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The application's parts, lowest first; tests, benches and tools may use any of them.
PARTS = ("core", "db", "controllers", "workflows", "activities", "api", "app", "worker")
CHECKED = {*PARTS, "tests", "bench", "tools"}
# What each part may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "db": {"core"},
    "controllers": {"core"},
    "workflows": {"core"},  # its pure leaves only: see PURE_FOR_WORKFLOWS
    "activities": {"core", "db", "controllers", "workflows"},  # workflows: its data types
    "api": {"core", "db", "controllers", "workflows"},
    "app": {"core", "db", "controllers", "workflows", "activities", "api"},
    "worker": {"app"},
}
# Workflow code runs in Temporal's sandbox and is replayed: of ours it imports only these.
PURE_FOR_WORKFLOWS = {"core.status"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    found = {}
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if relative.parts[0] not in CHECKED and path.name != "worker.py":
            continue
        if "migrations" in relative.parts or any(p.startswith(".") for p in relative.parts):
            continue
        found[module_name(path)] = path
    return found


def imported(path: Path, name: str, ours: set[str]) -> list[tuple[str, bool]]:
    """(module of ours, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a top-level ``with``/``if``/``try`` count as top
        for child in ast.walk(node):
            if isinstance(child, ast.Import | ast.ImportFrom) and not _in_function(node, child):
                top_level.add(id(child))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        modules = {_ours(target, ours) for target in targets} - {None, name}
        found += [(module, id(node) in top_level) for module in sorted(modules)]
    return found


def _in_function(root: ast.AST, target: ast.AST) -> bool:
    for node in ast.walk(root):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def _ours(target: str, ours: set[str]) -> str | None:
    """The longest module of ours that ``target`` names (a name inside it, or itself)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in ours:
            return candidate
    return None


def part_of(module: str) -> str:
    return module.split(".")[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", action="store_true", help="print module-level edges too")
    args = parser.parse_args()
    modules = sources()
    ours = set(modules)
    part_edges: Counter[tuple[str, str]] = Counter()
    module_edges: dict[str, set[str]] = defaultdict(set)
    examples: dict[tuple[str, str], str] = {}
    bad: list[str] = []
    for name, path in modules.items():
        source = part_of(name)
        for target, top in imported(path, name, ours):
            if top:
                module_edges[name].add(target)
            dest = part_of(target)
            if dest == source:
                continue
            part_edges[(source, dest)] += 1
            examples.setdefault((source, dest), f"{name} -> {target}")
            if source in ALLOWED and dest not in ALLOWED[source]:
                bad.append(f"{name} imports {target} ({source} -> {dest} is not allowed)")
            elif source == "workflows" and target not in PURE_FOR_WORKFLOWS:
                bad.append(f"{name} imports {target} (workflow code imports only "
                           f"{sorted(PURE_FOR_WORKFLOWS)} outside workflows/)")
    print("edges between parts (imports, one example):")
    for (source, dest), count in sorted(part_edges.items()):
        mark = "" if source not in ALLOWED or dest in ALLOWED[source] else "   <-- not allowed"
        print(f"  {source:<11} -> {dest:<11} {count:4}  {examples[(source, dest)]}{mark}")
    if args.modules:
        print("module-level imports:")
        for name in sorted(module_edges):
            for target in sorted(module_edges[name]):
                print(f"  {name} -> {target}")
    circles = cycles({k: v for k, v in module_edges.items() if part_of(k) in PARTS})
    for circle in circles:
        bad.append("import circle: " + " -> ".join(circle))
    bad = list(dict.fromkeys(bad))
    if bad:
        print(f"\n{len(bad)} problem(s):")
        for line in bad:
            print(f"  {line}")
        return 1
    print("\nno back-edge, no import circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
