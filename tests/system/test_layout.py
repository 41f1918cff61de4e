"""The package's shape: the method in ``core/``, the machinery beside it, the apparatus in
``tools/`` imported by nobody, and no import cycle (imports inside functions count)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "src" / "mgpo"
SCRIPTS = (REPO / "train.py", REPO / "eval.py")
HANDOVERS = ("Experience", "Rollout", "Trajectory")
"""The typed hand-overs of the loop: every field says what it holds (no ``object``, no callable)."""


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None) for every import of an ``mgpo`` module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names if a.name.split(".")[0] == "mgpo")
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != "mgpo":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                yield (sub, None) if sub in modules else (target, a.name)


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name, path, modules) if m in modules and m != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _script_problems(scripts) -> list[str]:
    """Root scripts parse the config and call into the package: never into the apparatus."""
    problems = []
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            problems += [f"{path.name} imports {n}: root scripts never import tools/" for n in names
                         if n.startswith("mgpo.tools")]
    return problems


def _handover_problems(name: str, tree: ast.AST) -> list[str]:
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in HANDOVERS:
            for field in node.body:
                if isinstance(field, ast.AnnAssign) and any(
                        isinstance(n, ast.Name) and n.id in ("object", "Callable", "Any")
                        for n in ast.walk(field.annotation)):
                    problems.append(f"{name}.{node.name}.{ast.unparse(field.target)} is typed "
                                    f"{ast.unparse(field.annotation)}: a hand-over says what each field holds")
    return problems


def _problems(root: Path = PACKAGE, scripts=SCRIPTS) -> list[str]:
    modules = _modules(root)
    graph = _graph(modules)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in _cycles(graph)]
    for name, deps in graph.items():
        for dep in deps:
            if dep.startswith("mgpo.tools") and not name.startswith("mgpo.tools"):
                problems.append(f"{name} imports {dep}: nothing outside tools/ imports tools/")
            if name.startswith(("mgpo.runtime", "mgpo.data")) and dep.startswith("mgpo.core"):
                problems.append(f"{name} imports {dep}: runtime/ and data/ never import core/")
    for name, path in modules.items():
        for module, imported in _imports(name, path, modules):
            if imported and imported.startswith("_") and not imported.startswith("__"):
                problems.append(f"{name} imports {module}.{imported}, another module's underscore name")
        if name.startswith("mgpo.core"):
            problems += _handover_problems(name, ast.parse(path.read_text()))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        problems.append(f"{name}.{node.name} is {lines} lines (functions in core/ stay within 60)")
    return problems + _script_problems(scripts)


def test_the_package_keeps_its_layout():
    assert _problems() == []


def test_the_folders_exist_and_core_is_a_reading_map():
    for folder in ("core", "runtime", "data", "eval", "tools"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
    assert "Reading order" in (PACKAGE / "core" / "__init__.py").read_text()


@pytest.mark.parametrize("files, expected", [
    ({"a.py": "from . import b\n", "b.py": "def f():\n    from .a import x\n"}, "import cycle: mgpo.a <-> mgpo.b"),
    ({"core/__init__.py": "", "tools/__init__.py": "", "core/x.py": "from ..tools import y\n", "tools/y.py": ""},
     "nothing outside tools/"),
    ({"runtime/__init__.py": "", "core/__init__.py": "", "runtime/r.py": "from ..core.c import f\n",
      "core/c.py": "def f():\n    pass\n"}, "never import core/"),
    ({"a.py": "from .b import _hidden\n", "b.py": "_hidden = 1\n"}, "underscore name"),
    ({"core/__init__.py": "", "core/long.py": "def f():\n" + "    x = 1\n" * 60}, "within 60"),
    ({"core/__init__.py": "", "core/t.py": "class Experience:\n    micro_loss: object\n"},
     "Experience.micro_loss is typed object"),
])
def test_each_rule_catches_its_break(tmp_path, files, expected):
    root = tmp_path / "mgpo"
    for rel, text in {"__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert any(expected in p for p in _problems(root, ())), _problems(root, ())


def test_a_root_script_importing_the_apparatus_is_caught(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("def main():\n    from mgpo.tools.plan import startup_line\n")
    assert _script_problems([script]) == ["train.py imports mgpo.tools.plan: root scripts never import tools/"]
    script.write_text("from mgpo.runtime.memory import startup_line\n")
    assert _script_problems([script]) == []


def test_every_core_module_has_its_test_file():
    """tests/ mirror the package: a reader finds the tests of core/<module>.py in tests/core/test_<module>.py."""
    modules = sorted(p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem != "__init__")
    missing = [m for m in modules if not (REPO / "tests" / "core" / f"test_{m}.py").is_file()]
    assert len(modules) >= 15 and missing == []
