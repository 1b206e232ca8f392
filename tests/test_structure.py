"""The code's shape, as the recipe-module issue asks for it: imports run one way (no cycle between the package's
modules, lazy imports inside functions included), no function outside tests/ is over 100 lines, and nothing outside
tritonrun/recipes/ branches on which recipe it has."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "tritonrun").rglob("*.py"), *(REPO / "bench").glob("*.py"), *(REPO / ".ci").glob("*.py"),
                  REPO / "train_speedrun.py", REPO / "sample.py"])


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (module level and inside functions)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    out = set()
    for target in found:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def test_no_import_cycle_in_the_package():
    paths = {_module_name(p): p for p in (REPO / "tritonrun").rglob("*.py")}
    graph = {name: _imports(path, name, set(paths)) for name, path in paths.items()}
    assert graph["tritonrun.train"] and graph["tritonrun.memory"], "the import scan found nothing: it is broken"
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(node):] + [node]))
        if node in done:
            return
        on_path.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        on_path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    library = {n for n in graph if not n.startswith("tritonrun.train")}
    assert not any("tritonrun.train" in graph[n] for n in library), "a library module imports the CLI"


def test_no_function_outside_tests_is_over_100_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def _names_a_recipe(node: ast.AST) -> bool:
    """A literal recipe name, or a tuple/list/set of them."""
    from tritonrun.recipes import RECIPES

    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_a_recipe(e) for e in node.elts)
    return isinstance(node, ast.Constant) and node.value in RECIPES


def test_no_recipe_comparison_outside_the_recipe_modules():
    """`recipe == "speedrun"`, `cfg.recipe in ("gpt2", ...)` and the like belong in tritonrun/recipes/: everyone
    else asks the recipe object. (Consistency checks between two recipe values, and membership in the registry,
    branch on no particular recipe.)"""
    found = []
    for path in SOURCES:
        if (REPO / "tritonrun" / "recipes") in path.parents:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn))
                                                     for op in node.ops):
                nodes = (node.left, *node.comparators)
                operands = [ast.get_source_segment(text, n) or "" for n in nodes]
                if any("recipe" in o.replace("recipes", "") for o in operands) and any(map(_names_a_recipe, nodes)):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.get_source_segment(text, node)}")
    assert not found, found
