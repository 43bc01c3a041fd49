"""The layout's rules (README, "How it works"), checked on the source: imports inside msa_cli/ only point down the
data path, no package imports a sibling on its own level, modules import each other without cycles, and no module
runs over 450 lines."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The data path, lowest first: a module may import its own level's package and anything below it.
LEVELS = [
    {"msa_cli.errors"},
    {"msa_cli.settings", "msa_cli.faults", "msa_kernels"},   # settings reject a bad variable with a user error
    {"msa_cli.corpus", "msa_cli.model"},
    {"msa_cli.memory"},
    {"msa_cli.engine"},
    {"msa_cli.qa"},
    {"msa_cli.ingest"},
    {"msa_cli.parallel"},                                          # a sharded bank: ingest, and engine for the rest
    {"msa_cli.evaluation", "msa_cli.chat", "msa_cli.training",   # an eval ingests its set's corpus first
     "msa_cli.service"},                                           # msa serve and msa mcp ingest and answer
    {"msa_cli.cli"},
    {"msa_cli.__main__"},
]
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in (("msa_cli", ROOT / "msa_cli"), ("msa_kernels", ROOT / "msa_kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            out[name] = path
    return out


def imports(name: str, path: Path) -> set[str]:
    return imports_in(name, path.read_text(), is_package=path.name == "__init__.py")


def imports_in(name: str, source: str, is_package: bool = False) -> set[str]:
    """Every msa module the module `name` imports, at the top or inside a function (a lazy import is still a
    dependency); the bare top-level packages are left out (their __init__ is empty)."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}   # `from . import bank` names a module
    known = modules()
    return {m for m in found if m in known and m not in (name, "msa_cli", "msa_kernels")}


def unit(module: str) -> str:
    """The package or top-level module a module belongs to on the path (msa_cli.memory.bank -> msa_cli.memory)."""
    for level in LEVELS:
        for u in level:
            if module == u or module.startswith(u + "."):
                return u
    raise AssertionError(f"{module} is on no level of the data path: add it to LEVELS and the README")


def level(module: str) -> int:
    return next(i for i, units in enumerate(LEVELS) if unit(module) in units)


def upward(name: str, targets: set[str]) -> list[str]:
    """The imports of `name` that do not point down the path (its own package aside)."""
    return [f"{name} (level {level(name)}) imports {t} (level {level(t)})" for t in sorted(targets)
            if unit(t) != unit(name) and level(t) >= level(name)]


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, if it has any."""
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*path, name, target]
            found = visit(target, [*path, name]) if target not in state else None
            if found:
                return found
        state[name] = "done"
        return None

    for name in sorted(graph):
        found = visit(name, []) if name not in state else None
        if found:
            return found
    return None


GRAPH = {name: imports(name, path) for name, path in modules().items()}
PATH = " -> ".join("/".join(sorted(u.split(".")[-1] for u in units)) for units in LEVELS)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_imports_only_point_down_the_data_path(name):
    assert not upward(name, GRAPH[name]), f"imports point down the path {PATH}"


def test_modules_import_each_other_without_cycles():
    assert cycle(GRAPH) is None, "import cycle: " + " -> ".join(cycle(GRAPH) or [])


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_runs_over_450_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{modules()[name].relative_to(ROOT)} has {lines} lines: split it by concern"


def test_the_checks_see_an_upward_import_a_sibling_and_a_cycle():
    lazy = imports_in("msa_cli.memory.bank", "def f():\n    from ..qa.ask import ask\n")
    assert lazy == {"msa_cli.qa.ask"} and upward("msa_cli.memory.bank", lazy)
    sibling = imports_in("msa_cli.ingest", "from . import evaluation\n")
    assert sibling == {"msa_cli.evaluation"} and upward("msa_cli.ingest", sibling)
    assert not upward("msa_cli.qa.ask", imports_in("msa_cli.qa.ask", "from ..engine import Engine\n"))
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_readme_draws_every_module():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("### The layout"):]
    block = block[block.index("```") + 3:]
    block = block[:block.index("```")]
    missing = [str(path.relative_to(ROOT)) for name, path in modules().items()
               if path.name != "__init__.py" and path.name not in block]
    assert not missing, f"README's layout does not name {missing}"
