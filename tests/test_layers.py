"""Imports point down the layers (README "Layout"): a module may import its own layer or a lower one, never a
higher one, and two packages of one layer never import each other. Every import counts, also one inside a
function; the lazy ones that are allowed say why in a comment on the line above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import adala

SRC = Path(adala.__file__).resolve().parent

# lowest first; a top-level module or package of adala belongs to exactly one layer
LAYERS = [
    {"errors", "paths", "runtime", "tracing", "checks", "files"},     # leaves
    {"attention"},
    {"models"},
    {"data", "train", "outdir"},
    {"stages", "evaluation"},
    {"recipes", "compare", "report", "hybrid", "demo", "benchmark", "plotting", "configs"},
    {"cli", "__main__"},
]
# ``from adala import __version__`` is allowed from anywhere: the root package holds nothing else eagerly
ROOT_NAMES = {"__version__"}


def layer_of(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"adala.{top} is in no layer: add it to LAYERS here and to the README's Layout")


def module_name(path: Path) -> str:
    parts = ["adala", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(absolute module, imported name) pairs of an import statement, adala's only."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == "adala"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "adala":
        return []
    return [(target, a.name) for a in node.names]


def edges() -> list[tuple[str, int, str, str]]:
    """(importing module, line, importing top-level name, imported top-level name) for every adala import."""
    out = []
    for path in sorted(SRC.rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # ast.walk reaches imports inside functions and classes too
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target, name in imported(node, module, path.name == "__init__.py"):
                parts = target.split(".")
                if len(parts) == 1:  # from adala import X
                    if name in ROOT_NAMES or module == "adala":
                        continue
                    top = name
                else:
                    top = parts[1]
                src_parts = module.split(".")
                if len(src_parts) == 1:  # the root package itself: lazy re-exports only
                    continue
                out.append((module, node.lineno, src_parts[1], top))
    return out


def test_every_import_points_down_or_sideways():
    found = edges()
    assert len(found) > 200  # the walk saw the package's imports, inside functions too
    upward = [f"{m}:{line} imports adala.{dst} (layer {layer_of(dst)} > {layer_of(src)})"
              for m, line, src, dst in found if layer_of(dst) > layer_of(src)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for _, _, src, dst in edges():
        if src != dst:
            graph.setdefault(src, set()).add(dst)
    both = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                   if a in graph.get(b, set())})
    assert not both, f"packages importing each other: {both}"


def test_the_check_fails_on_an_upward_import(tmp_path):
    """The walk finds an import inside a function body (the kind that used to hide models -> stages)."""
    code = "def f():\n    from ..stages import finetune\n"
    node = ast.parse(code).body[0].body[0]
    ((target, name),) = imported(node, "adala.models.config", False)
    assert (target, name) == ("adala.stages", "finetune")
    assert layer_of(target.split(".")[1]) > layer_of("models")


def test_imports_inside_functions_say_why():
    """Imports go to the top of a module; the exceptions (optional dependencies, import cycles inside a
    package, what keeps ``import adala`` and ``adala --help`` fast) carry a ``# lazy: <why>`` comment on
    the line above the first import of the group."""
    unexplained = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            up, in_function = node, False
            while up in parents and not in_function:
                up = parents[up]
                in_function = isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef))
            if not in_function:
                continue
            i = node.lineno - 2  # walk up over the group's other imports (and their continuation lines)
            while i >= 0 and (lines[i].strip().startswith(("from ", "import ", ")")) or lines[i].strip() == ""
                              or lines[i].startswith(" " * (node.col_offset + 4))):
                i -= 1
            if "# lazy:" not in lines[node.lineno - 1] and not (i >= 0 and "# lazy:" in lines[i]):
                unexplained.append(f"{path.relative_to(SRC)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not unexplained, "imports inside functions without a '# lazy: why' comment:\n" + "\n".join(unexplained)
