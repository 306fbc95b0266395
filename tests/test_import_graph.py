"""The layers of clpeft stay visible: an import that crosses one the wrong way fails here.

Every module of the installed packages (``clpeft/``, ``scenarios/`` as ``clpeft.scenarios``,
``strategies/`` as ``clpeft.strategies``: pyproject's ``package-dir``) is parsed with :mod:`ast`;
every import counts, at the top, inside a function (lazy) or under ``TYPE_CHECKING``, and so do
``importlib.import_module("...")`` calls with a literal name. The rules (issue 21, STYLE.md §3):

- the core never imports the user tools (``clpeft.tools``); only the command line does;
- components never import strategies, the engine, a run or the training step (timm's ``layers/``
  never import ``models/``);
- merging never imports the engine, a run, the training step or strategies;
- scenarios never import strategies;
- strategies never import other strategies: what two methods share is a component.

A failure names the module, its file and line, and the import.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
TOOLS = "clpeft.tools"
ENTRY_POINTS = ("clpeft.cli", "clpeft.__main__")  # the commands: they wire the tools to the core
ENGINE = ("clpeft.engine", "clpeft.loops", "clpeft.run", "clpeft.training")
STRATEGIES = "clpeft.strategies"
# Import names that resolve to an installed package: strategies/ and scenarios/ import as these too.
ALIASES = {"strategies": STRATEGIES, "scenarios": "clpeft.scenarios"}


@dataclass(frozen=True)
class Edge:
    """``module`` (in ``path``) imports ``target`` at ``line``."""

    module: str
    path: Path
    line: int
    target: str

    def __str__(self) -> str:
        return f"{self.module} ({self.path.relative_to(ROOT)}:{self.line}) imports {self.target}"


@dataclass(frozen=True)
class Rule:
    """Modules in ``importers`` (packages, or every module but ``exempt``) never import ``forbidden``."""

    name: str
    importers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()

    def applies_to(self, module: str) -> bool:
        return not within(module, self.exempt) and within(module, self.importers)

    def violations(self, edges: list[Edge]) -> list[Edge]:
        return [e for e in edges if self.applies_to(e.module) and within(e.target, self.forbidden)]


RULES = [
    Rule("the core never imports the user tools", ("clpeft",), (TOOLS,), exempt=(TOOLS, *ENTRY_POINTS)),
    Rule("components never import strategies or the engine", ("clpeft.components",), (STRATEGIES, *ENGINE)),
    Rule("merging never imports the engine or strategies", ("clpeft.merging",), (STRATEGIES, *ENGINE)),
    Rule("scenarios never import strategies", ("clpeft.scenarios",), (STRATEGIES,)),
    Rule("strategies never import strategies (shared logic lives in a component)", (STRATEGIES,), (STRATEGIES,)),
]


def within(name: str, packages: tuple[str, ...]) -> bool:
    """``name`` is one of ``packages`` or inside one.

    ``clpeft.run.Run`` is in ``clpeft.run``; ``clpeft.run_directory`` is not.
    """
    return any(name == p or name.startswith(p + ".") for p in packages)


def modules() -> dict[str, Path]:
    """Every installed module's dotted name and file, from pyproject's ``package-dir`` mapping."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {}
    for package, folder in package_dir.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _absolute(name: str) -> str:
    head, _, rest = name.partition(".")
    return ALIASES[head] + (f".{rest}" if rest else "") if head in ALIASES else name


def imports_of(module: str, path: Path) -> list[Edge]:
    """Each name ``module`` imports: ``from a.b import c`` gives ``a.b.c`` (``c`` may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            names = [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                names = [arg.value]
        edges += [Edge(module, path, node.lineno, _absolute(name)) for name in names]
    return edges


def _is_import_module(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return name in ("import_module", "__import__")


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    return [edge for module, path in modules().items() for edge in imports_of(module, path)]


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name.replace(" ", "_"))
def test_no_import_crosses_a_layer(rule, edges):
    crossings = rule.violations(edges)
    assert not crossings, f"{rule.name}, but:\n" + "\n".join(f"  {e}" for e in crossings)


def test_the_scan_sees_every_layer_and_lazy_imports(edges):
    """The rules above cannot pass vacuously: each layer has modules, and an import inside a function is seen."""
    names = modules()
    for package in ("clpeft.components", "clpeft.merging", "clpeft.scenarios", STRATEGIES, TOOLS, "clpeft.engine"):
        assert any(within(m, (package,)) for m in names), f"no module found in {package}"
    lazy = [e for e in edges if e.module == "clpeft.cli" and within(e.target, (TOOLS,))]
    assert lazy, "clpeft.cli's imports of the tools (inside its command functions) were not found"


def test_relative_and_aliased_imports_resolve(tmp_path):
    source = tmp_path / "pool.py"
    source.write_text(
        "from . import heads\nfrom ..engine import Engine\nimport strategies.l2p\n"
        "def later():\n    import importlib\n    importlib.import_module('clpeft.tools.compare')\n"
    )
    targets = {e.target for e in imports_of("clpeft.components.pool", source)}
    assert targets == {"clpeft.components.heads", "clpeft.engine.Engine", "clpeft.strategies.l2p", "importlib", "clpeft.tools.compare"}
