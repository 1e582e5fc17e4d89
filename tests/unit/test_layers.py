"""The architecture, checked: which layer may import which.  Arrows run one way, down; a
module never reads another layer's private names.  (README, "Architecture", draws this.)
Imports under ``if TYPE_CHECKING:`` count too: an annotation is a dependency of the reader."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2] / "vballoon"

# layer -> the layers it may import (besides itself).  The ground floor (wire, errors, units,
# sockets) may be imported by everyone and imports nothing of vballoon but itself.
GROUND = {"wire", "errors", "units", "sockets", "ratelimit", "protocol"}
ALLOWED: dict[str, set[str]] = {
    "ground": set(),
    "virtio": set(),
    "fpmap": set(),
    "vhost": {"virtio"},
    "devices": {"virtio", "fpmap"},
    "control": {"fpmap"},
    "sim": set(),                      # the simulated guest keeps its own framing and numbering
    "migrate": {"control"},
    "app": {"vhost", "virtio", "devices", "fpmap", "control", "sim", "migrate"},
    "testing": {"app", "vhost", "virtio", "devices", "sim"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in GROUND:
        return "ground"            # the package itself holds only __version__
    if parts[1] == "__main__":
        return "top"
    return parts[1]


def imports() -> list[tuple[str, str, int]]:
    """(importing module, imported vballoon module, line) for every import, lazy ones too."""
    out = []
    for path in ROOT.rglob("*.py"):
        if path.name.endswith("_build.py"):
            continue
        rel = path.relative_to(ROOT.parent).with_suffix("")
        mod = ".".join(rel.parts)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        if path.name == "__init__.py":
            mod = mod.removesuffix(".__init__")
            pkg = mod
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names[:1]:
                if name == "vballoon" or name.startswith("vballoon."):
                    out.append((mod, name, node.lineno))
    return out


def test_every_import_runs_down_the_layers():
    wrong = []
    for mod, target, line in imports():
        a, b = layer_of(mod), layer_of(target)
        if a == "top" or b in ("ground", a):
            continue
        if b == "top" or b not in ALLOWED.get(a, set()):
            wrong.append(f"{mod}:{line} imports {target} ({a} -> {b})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_ground_floor_stands_alone():
    wrong = [f"{m}:{line} imports {t}" for m, t, line in imports()
             if layer_of(m) == "ground" and layer_of(t) not in ("ground",)]
    assert not wrong, wrong


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    for mod, target, _ in imports():
        graph.setdefault(mod, set()).add(target)
    modules = set(graph)

    def resolve(t: str) -> str | None:         # "vballoon.x.y.Name" -> the module it names
        while t and t not in modules:
            t = t.rpartition(".")[0]
        return t or None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in graph.items()}
    # a package's __init__ re-exporting its modules is not a circle
    edges = {m: {t for t in ts if not m.startswith(t + ".") and not t.startswith(m + ".")}
             for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_no_module_reads_another_modules_private_names():
    wrong = []
    for path in ROOT.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "vballoon" in node.module:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and \
                            a.name not in ("_vring", "_fastbits"):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {a.name}")
    assert not wrong, wrong
