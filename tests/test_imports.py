"""The layers import one way (docs/DESIGN.md, "Modules, and which way they depend"), read from the source.

- No import cycle among the project's modules; imports inside functions count (that is where
  cycles hide).
- Nothing takes an underscore name from another of the project's modules: not by `from m import
  _x`, not as `m._x` off an imported module, not by `monkeypatch.setattr(m, "_x", ...)`. Tests
  included; the stated exceptions are EXCEPTIONS, and one that no longer happens fails too.
- pallas_kernels imports nothing from kvjax; neither imports eval, train_controller, the
  experiments or the tests; eval and train_controller do not import each other; only tests
  import a command's `__main__`.

The linter (ruff, configured in pyproject.toml) checks the rest: unused imports, undefined names.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("kvjax", "pallas_kernels", "eval", "train_controller")
# (importer, "module._name") -> why it is allowed for now
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: pathlib.Path) -> str:
    """Dotted name: packages from the root; tests by file name (pytest puts tests/ on the path)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "tests":
        return parts[-1]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for top in PACKAGES + ("experiments", "tests") for p in sorted((ROOT / top).rglob("*.py"))}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


class Imports(ast.NodeVisitor):
    """The project modules a file imports, and the private names it takes from them."""

    def __init__(self, name: str):
        self.name, self.package = name, name if FILES[name].name == "__init__.py" else name.rpartition(".")[0]
        self.targets: set[str] = set()
        self.private: set[str] = set()  # "module._name"
        self.bound: dict[str, str] = {}  # local name -> project module

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module
        base = self.package.split(".")[:len(self.package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name in FILES:
                self.targets.add(alias.name)
                if alias.asname:
                    self.bound[alias.asname] = alias.name

    def visit_ImportFrom(self, node):
        module = self.absolute(node)
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            if sub in FILES:  # a module
                self.targets.add(sub)
                self.bound[alias.asname or alias.name] = sub
            elif module in FILES:  # a name defined in (or re-exported by) the module
                self.targets.add(module)
                if private(alias.name):
                    self.private.add(sub)

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.bound and private(node.attr):
            self.private.add(f"{self.bound[node.value.id]}.{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node):  # monkeypatch.setattr(module, "_name", ...) / setattr("pkg.module._name", ...)
        if isinstance(node.func, ast.Attribute) and node.func.attr == "setattr" and node.args:
            first, rest = node.args[0], node.args[1:]
            if isinstance(first, ast.Name) and first.id in self.bound and rest and isinstance(rest[0], ast.Constant):
                if isinstance(rest[0].value, str) and private(rest[0].value):
                    self.private.add(f"{self.bound[first.id]}.{rest[0].value}")
            elif isinstance(first, ast.Constant) and isinstance(first.value, str) and "." in first.value:
                module, _, attr = first.value.rpartition(".")
                if module in FILES and private(attr):
                    self.private.add(first.value)
        self.generic_visit(node)


def read(name: str) -> Imports:
    imports = Imports(name)
    imports.visit(ast.parse(FILES[name].read_text(), str(FILES[name])))
    imports.targets.discard(name)
    imports.private = {p for p in imports.private if p.rpartition(".")[0] != name}
    return imports


IMPORTS = {name: read(name) for name in FILES}


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(IMPORTS[v].targets):
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
                out.append(sorted(component))

    for v in sorted(IMPORTS):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_project():
    assert {"kvjax.policies", "kvjax.flags", "pallas_kernels.cpu_attention", "eval.__main__", "test_policies"} \
        <= set(FILES)
    assert "kvjax.layout" in IMPORTS["kvjax.policies"].targets and "kvjax.policies" in IMPORTS["kvjax.flags"].targets


def test_no_import_cycle():
    assert cycles() == []


def test_no_private_name_is_taken_from_another_module():
    taken = {(name, p) for name, imports in IMPORTS.items() for p in imports.private}
    assert taken - set(EXCEPTIONS) == set(), "make it public (and documented) or test through the public function"
    assert set(EXCEPTIONS) - taken == set(), "no longer happens: remove it from EXCEPTIONS"


def layer(name: str) -> str:
    top = name.split(".")[0]
    return top if top in PACKAGES + ("experiments",) else "tests"


# importer's layer -> layers it may not import
FORBIDDEN = {
    "pallas_kernels": {"kvjax", "eval", "train_controller", "experiments", "tests"},
    "kvjax": {"eval", "train_controller", "experiments", "tests"},
    "eval": {"train_controller", "experiments", "tests"},
    "train_controller": {"eval", "experiments", "tests"},
    "experiments": {"tests"},
}


@pytest.mark.parametrize("name", sorted(n for n in IMPORTS if layer(n) != "tests"))
def test_layers_import_downward(name):
    wrong = sorted(t for t in IMPORTS[name].targets if layer(t) in FORBIDDEN.get(layer(name), set()))
    commands = sorted(t for t in IMPORTS[name].targets if t.endswith(".__main__"))
    assert not wrong + commands, f"{name} imports {wrong + commands}"
