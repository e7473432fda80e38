"""The package's imports show its layers: no import cycles inside ``cmscale``, and no
cmscale-internal import inside a function (those hide cycles)."""

from __future__ import annotations

import ast
import os

import pytest

from tests.support import REPO

ROOT = str(REPO)
PACKAGE = "cmscale"


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(dirpath, name)
    return out


def imports(module: str, path: str, known: set[str]):
    """(line, imported cmscale module, inside a function?) for every import statement."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append((child.lineno, alias.name, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    base = ".".join(base + ([child.module] if child.module else []))
                else:
                    base = child.module or ""
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append((child.lineno, sub if sub in known else base, in_function))
            visit(child, inner)

    visit(tree, False)
    # an import of a.b.c also runs a and a.b: depend on the deepest module that exists
    result = []
    for line, name, in_function in found:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if (name and name.split(".")[0] == PACKAGE and name != module
                and (line, name, in_function) not in result):
            result.append((line, name, in_function))
    return result


def graph() -> tuple[dict[str, set[str]], dict[str, list]]:
    mods = modules()
    known = set(mods)
    edges, found = {}, {}
    for m, path in mods.items():
        found[m] = imports(m, path, known)
        edges[m] = {name for _, name, _ in found[m]}
    return edges, found


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = dfs(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = dfs(m)
            if cycle:
                return cycle
    return None


def test_import_graph_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    edges, _ = graph()
    assert "cmscale.runs" in edges["cmscale.sample"]
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def inner_imports() -> list[str]:
    _, found = graph()
    mods = modules()
    return [f"{os.path.relpath(mods[m], ROOT)}:{line}: {name}"
            for m in sorted(found) for line, name, inside in found[m] if inside]


def test_no_internal_import_inside_a_function():
    bad = inner_imports()
    assert not bad, "cmscale-internal imports inside functions:\n" + "\n".join(bad)
