"""The renovation's figures, counted on a source tree: imports that run back up between
packages, branches on a family's name outside ``families/``, and the longest parameter list.

    python benchmarks/structure.py [PACKAGE_DIR]      (default: this checkout's difcompress/)

"Back-up arrows" are the package-level imports that lie on an import circle between
packages (A imports B while B, directly or through others, imports A): with none, the
packages form layers. A "family branch" is a comparison of a family's name or its
conditioning kind with a string (``family.name == "dit"``, ``conditioning == "text"``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

FAMILY_ATTRIBUTES = {"conditioning", "family"}


def modules(package: Path) -> dict[str, Path]:
    return {".".join(p.relative_to(package).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__"):
            p for p in package.rglob("*.py")}


def top_package(module: str) -> str:
    return module.split(".")[0] or "__init__"


def package_graph(package: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in modules(package).items():
        source = top_package(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("difcompress."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("difcompress.")]
            for name in names:
                target = top_package(name.removeprefix("difcompress."))
                if target != source:
                    graph.setdefault(source, set()).add(target)
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return False


def back_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if reaches(graph, b, a))


def _is_family_name(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in FAMILY_ATTRIBUTES or (node.attr == "name" and _mentions_family(node.value))
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value in FAMILY_ATTRIBUTES
    return False


def _mentions_family(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Attribute, ast.Name)) and "family" in getattr(n, "attr", getattr(n, "id", ""))
               for n in ast.walk(node))


def family_branches(package: Path) -> list[str]:
    found = []
    for module, path in modules(package).items():
        if module.startswith("families"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(_is_family_name(s) for s in sides) and any(
                        isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                    found.append(f"{module}:{node.lineno}")
    return found


def longest_parameter_lists(package: Path, top: int = 3) -> list[tuple[int, str]]:
    lists = []
    for module, path in modules(package).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
                lists.append((len(names), f"{module}.{node.name}"))
    return sorted(lists, reverse=True)[:top]


def main() -> None:
    package = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "difcompress"
    arrows = back_arrows(package_graph(package))
    branches = family_branches(package)
    print(f"back-up arrows between packages: {len(arrows)}" + "".join(f"\n  {a}" for a in arrows))
    print(f"branches on family names outside families/: {len(branches)}" + "".join(f"\n  {b}" for b in branches))
    print("longest parameter lists:" + "".join(f"\n  {n:3d}  {where}" for n, where in longest_parameter_lists(package)))


if __name__ == "__main__":
    main()
