"""The package's import graph and its cycles, every import counted (top-level, inside functions,
under TYPE_CHECKING), plus the lines of each module.

    python scripts/import_graph.py [--src src] [--package sparseft] [--core]

``--core`` leaves out ``sparseft.app`` (the CLI and benchmarks' application layer). Prints each
module's in-package imports, the strongly connected components with more than one module (the
import loops) and the line count per module.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def modules(src: Path, package: str) -> dict[str, Path]:
    root = src / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="src")
    ap.add_argument("--package", default="sparseft")
    ap.add_argument("--core", action="store_true", help="leave out the app (sparseft.app)")
    args = ap.parse_args()
    mods = modules(Path(args.src), args.package)
    if args.core:
        mods = {k: v for k, v in mods.items() if not k.startswith(f"{args.package}.app")}
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    short = lambda m: m[len(args.package) + 1:] or args.package  # noqa: E731
    for name in sorted(graph):
        print(f"{short(name):28s} {len(mods[name].read_text().splitlines()):5d} lines  -> {', '.join(sorted(map(short, graph[name]))) or '-'}")
    loops = cycles(graph)
    print(f"\nimport loops: {len(loops)}")
    for comp in loops:
        print("  " + " <-> ".join(map(short, comp)))


if __name__ == "__main__":
    main()
