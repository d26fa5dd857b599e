"""No import cycles in python/nanotune: every module's imports (module level and
inside functions, absolute and relative; `if TYPE_CHECKING:` blocks left out) form
a graph without cycles. Importing a submodule runs its packages' __init__ first,
so `import a.b.c` from outside `a.b` is an edge to a.b and a.b.c (and a)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def modules_of(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every .py under package_dir (a package named
    after its directory); a package is named by its __init__.py."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Import nodes anywhere in the tree (functions, classes, try blocks...) except
    the bodies of `if TYPE_CHECKING:` (their `else:` branches run, so they count)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: pathlib.Path) -> dict[str, set[str]]:
    """module -> the package's modules that importing it runs (directly)."""
    modules = modules_of(package_dir)
    top = package_dir.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]  # the package relative imports start from
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        if is_package:
            own_packages.add(name)
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
                continue
            if node.level:
                base_parts = here.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets.add(base)
            targets.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
        for target in targets:
            if target != top and not target.startswith(top + "."):
                continue  # not ours
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # the packages on the way run first
                dep = ".".join(parts[:i])
                if dep in modules and dep != name and dep not in own_packages:
                    graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        path.append(node)
        for dep in sorted(graph[node]):
            if color[dep] == GREY:
                return path[path.index(dep):] + [dep]
            if color[dep] == WHITE and (cycle := visit(dep)):
                return cycle
        path.pop()
        color[node] = BLACK
        return None

    for node in sorted(graph):
        if color[node] == WHITE and (cycle := visit(node)):
            return cycle
    return None


def check(package_dir: pathlib.Path) -> None:
    cycle = find_cycle(import_graph(package_dir))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nanotune_has_no_import_cycles():
    graph = import_graph(ROOT / "python" / "nanotune")
    assert "nanotune.sidecar.runtime" in graph["nanotune.sidecar.__main__"]  # the checker sees our imports
    assert "nanotune.errors" in graph["nanotune.models"]
    check(ROOT / "python" / "nanotune")


def test_the_sidecar_rooms_import_one_way():
    graph = import_graph(ROOT / "python" / "nanotune")
    side = "nanotune.sidecar."
    handlers = {side + "builtin", *(m for m in graph if m.startswith("nanotune.methods."))}
    for room in (side + "transport", side + "tensors", side + "dispatch"):
        assert not graph[room] & {side + "runtime", *handlers}, room
    for handler in handlers:
        assert side + "runtime" not in graph[handler], handler
    assert [m for m, deps in graph.items() if side + "runtime" in deps] == [side + "__main__"]


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_the_checker_reports_a_cycle(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import g\n",  # function-level, relative
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import pkg.a\nimport os\n",  # absolute; os is not ours
    })
    cycle = find_cycle(import_graph(pkg))
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    try:
        check(pkg)
    except AssertionError as e:
        assert "import cycle: pkg.a -> pkg.b -> pkg.sub.c -> pkg.a" in str(e)
    else:
        raise AssertionError("the cycle was not reported")


def test_type_checking_imports_and_own_packages_are_no_cycle(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "from .a import x\n",  # a package importing its submodule...
        "pkg/a.py": "from typing import TYPE_CHECKING\nfrom . import b\nx = 1\n"
                    "if TYPE_CHECKING:\n    from .b import y\n",
        "pkg/b.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import x\nelse:\n    y = 2\n",
    })  # ...whose submodule imports a sibling: pkg is already running, not an edge
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "b.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from .a import x\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.a"]
