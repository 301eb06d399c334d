"""kdlib's modules form layers: the graph of their imports of one another has no cycle, and a kdlib
module is imported inside a function only with a comment that says why.

The graph is read from the source with ``ast``, so it holds every import a module can make: at the
top, inside functions, and ``from kdlib import name`` (a submodule, or a lazily exported name,
resolved through ``kdlib._EXPORTS`` to the module that owns it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kdlib"


def _module_files(package: Path) -> dict[str, Path]:
    """``kdlib.x`` -> its file, for every module of the package (``kdlib`` itself is ``__init__.py``)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _lazy_exports(package: Path) -> dict[str, str]:
    """Name -> the ``kdlib.x`` module that defines it, from ``_EXPORTS`` in the package's ``__init__.py``."""
    for node in ast.parse((package / "__init__.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            exports = ast.literal_eval(node.value)
            return {name: f"{package.name}.{module}" for module, names in exports.items() for name in names}
    return {}


def _imports(
    module: str, tree: ast.Module, exports: dict[str, str], is_package: bool
) -> list[tuple[ast.stmt, list[str]]]:
    """Every import statement of ``module`` (parsed as ``tree``; ``is_package``: an ``__init__.py``) with the
    package's modules it names."""
    root = module.split(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names if alias.name.split(".")[0] == root]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                package = module.split(".")
                package = package[: len(package) - node.level + is_package]
                base = ".".join([*package, *([node.module] if node.module else [])])
            if base.split(".")[0] != root:
                continue
            if base == root:  # from kdlib import name: a submodule, or a lazily exported name
                targets = [exports.get(alias.name, f"{root}.{alias.name}") for alias in node.names]
            else:
                targets = [base]
        else:
            continue
        found.append((node, targets))
    return found


def _parsed(package: Path) -> dict[str, tuple[Path, ast.Module, list[tuple[ast.stmt, list[str]]]]]:
    """``kdlib.x`` -> (file, syntax tree, its imports) for every module of the package."""
    files = _module_files(package)
    exports = _lazy_exports(package)
    parsed = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parsed[module] = (path, tree, _imports(module, tree, exports, path.name == "__init__.py"))
    return parsed


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``kdlib.x`` -> the package's modules it imports anywhere (top level or inside functions)."""
    parsed = _parsed(package)
    graph: dict[str, set[str]] = {}
    for module, (_, _, imports) in parsed.items():
        edges = set()
        for _, targets in imports:
            for target in targets:
                # `import kdlib.a.b` or `from kdlib.a import b`: the deepest part that is a module
                while target not in parsed and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None when it has none (a depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def uncommented_function_imports(package: Path = PACKAGE) -> list[str]:
    """``file:line: import`` of every import of a package module inside a function or class that has no
    comment on its line or above the block of imports it belongs to."""
    found = []
    for path, tree, imports in _parsed(package).values():
        lines = path.read_text(encoding="utf-8").splitlines()
        nested = {id(node) for scope in ast.walk(tree)
                  if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                  for node in ast.walk(scope) if node is not scope}
        import_lines = {n for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                        for n in range(node.lineno, node.end_lineno + 1)}
        for node, targets in imports:
            if not targets or id(node) not in nested or "#" in lines[node.lineno - 1]:
                continue
            above = node.lineno - 1  # a comment may head the block of imports this one belongs to
            while above > 0 and (above in import_lines or not lines[above - 1].strip()):
                above -= 1
            if not (above and lines[above - 1].strip().startswith("#")):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


# ---------------------------------------------------------------------------------------------
# kdlib as it is
# ---------------------------------------------------------------------------------------------


def test_kdlib_imports_have_no_cycle():
    graph = import_graph()
    assert {"kdlib.config", "kdlib.models", "kdlib.benchmark", "kdlib.oos"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "kdlib import cycle: " + " -> ".join(cycle)


def test_kdlib_modules_are_imported_in_functions_only_with_a_reason():
    found = uncommented_function_imports()
    assert not found, "import these at the top, or say in a comment why not:\n" + "\n".join(found)


def test_the_first_imports_of_a_run_do_not_load_torch():
    """The runner and a notebook's first cell import these before the parameter check, which comes
    before torch loads."""
    code = ("import sys, kdlib.io, kdlib.session, kdlib.config, kdlib.paths, kdlib.run\n"
            "from kdlib import RunPaths, config_from_notebook, prepare_session, project_root\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# The checks themselves: they see the cycles and imports they are for
# ---------------------------------------------------------------------------------------------


def _package(tmp_path: Path, **modules: str) -> Path:
    package = tmp_path / "kdlib"
    package.mkdir()
    (package / "__init__.py").write_text(modules.pop("__init__", '_EXPORTS = {"b": ["B"]}\n'))
    for name, source in modules.items():
        (package / f"{name}.py").write_text(source)
    return package


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = _package(tmp_path, a="from kdlib.b import B\n", b="def f():\n    from kdlib.a import x\n")
    assert find_cycle(import_graph(package)) == ["kdlib.a", "kdlib.b", "kdlib.a"]
    assert uncommented_function_imports(package) == ["kdlib/b.py:2: from kdlib.a import x"]


def test_a_cycle_through_the_lazy_exports_is_found(tmp_path):
    package = _package(tmp_path, a="def f():\n    from kdlib import B  # lazily\n", b="import kdlib.a\n")
    assert find_cycle(import_graph(package)) == ["kdlib.a", "kdlib.b", "kdlib.a"]
    assert uncommented_function_imports(package) == []  # commented on its line


def test_a_comment_may_head_a_block_of_imports(tmp_path):
    package = _package(tmp_path, a="def f():\n    # why\n    import os\n\n    from kdlib import b\n",
                       b="def g():\n    x = 1\n    from kdlib import a\n")
    assert uncommented_function_imports(package) == ["kdlib/b.py:3: from kdlib import a"]


def test_a_submodule_named_in_from_kdlib_import_is_an_edge(tmp_path):
    package = _package(tmp_path, a="from kdlib import b\n", b="# a reason\nfrom kdlib import a\n")
    assert find_cycle(import_graph(package)) == ["kdlib.a", "kdlib.b", "kdlib.a"]


def test_layers_without_a_cycle_pass(tmp_path):
    package = _package(tmp_path, a="from kdlib.b import B\nimport os\n", b="import json\n",
                       c="from kdlib import B, a\n")
    assert import_graph(package) == {"kdlib": set(), "kdlib.a": {"kdlib.b"}, "kdlib.b": set(),
                                     "kdlib.c": {"kdlib.a", "kdlib.b"}}
    assert find_cycle(import_graph(package)) is None
