"""The package's layers: no import circles, and each side imports only what it should."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tvlars_ray"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at the top or inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in files and c != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
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


def test_no_import_circles():
    assert _cycles(_imports()) == []


def test_the_cycle_finder_finds_long_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _third_party(module: str) -> set[str]:
    path = PACKAGE / (module.removeprefix("tvlars_ray.").replace(".", "/") + ".py")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


@pytest.mark.parametrize("module", ["worker", "train", "classification", "bt", "trial"])
def test_worker_side_never_knows_tune(module):
    assert not any(n == "ray.tune" or n.startswith("ray.tune.") for n in _third_party(module))


def test_tune_side_never_touches_tensors():
    assert not any(n == "torch" or n.startswith("torch.") for n in _third_party("sweep"))


def test_what_the_train_controller_unpickles_never_imports_torch():
    """Each trial starts a fresh controller process; torch there cost seconds per trial."""
    code = ("import sys, tvlars_ray.train_controller; "
            "print(sorted(m for m in ('torch', 'ray.tune') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent, check=True)
    assert done.stdout.strip() == "[]"


def test_recipes_sit_on_the_worker_library_never_on_each_other():
    graph = _imports()
    for recipe in ("tvlars_ray.classification", "tvlars_ray.bt"):
        assert "tvlars_ray.worker" in graph[recipe]
        assert not graph[recipe] & {"tvlars_ray.classification", "tvlars_ray.bt",
                                    "tvlars_ray.train"}
    assert "tvlars_ray.train" not in graph["tvlars_ray.worker"]


def _readme_layers() -> list[str]:
    """The README's layer map, top to bottom, as module names (a folder: its package)."""
    text = (PACKAGE.parent / "README.md").read_text()
    block = text.split("<!-- layers: one line per module, top to bottom -->", 1)[1]
    lines = block.split("```", 2)[1].strip().splitlines()
    return ["tvlars_ray." + line.split()[0].rstrip("/") for line in lines]


def _unit(module: str) -> str:
    """A module's entry in the map: itself, or its subpackage (tvlars_ray.optim.lars -> optim)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_the_readme_map_lists_every_module_above_what_it_imports():
    layers = _readme_layers()
    graph = _imports()
    units = {_unit(m) for m in graph if m != "tvlars_ray"}
    assert sorted(layers) == sorted(units), "the README's layer map lists every module once"
    rank = {name: i for i, name in enumerate(layers)}  # 0 is the top
    upward = [(a, b) for a, targets in graph.items() if a != "tvlars_ray" for b in targets
              if b != "tvlars_ray" and _unit(a) != _unit(b) and rank[_unit(b)] <= rank[_unit(a)]]
    assert upward == [], "these imports point up the README's layer map"
