import ast
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import msa_kernels
from conftest import msa_env
from msa_cli import errors
from msa_cli.model import loading

PROBE = """
import importlib.util, transformers.utils
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec else None)
print(transformers.utils.is_kernels_available())
"""


@pytest.mark.parametrize("where", ["elsewhere", "repo root"])
def test_our_kernels_do_not_shadow_hugging_faces_kernels_package(tmp_path, where):
    # transformers imports Hugging Face's `kernels` distribution; neither an installed msa nor a checkout (whose
    # root is on sys.path when `python -m msa_cli.cli` or the tests run there) may provide one.
    cwd = tmp_path if where == "elsewhere" else ROOT
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                         check=True).stdout.split()
    origin, available = out
    ours = str(Path(msa_kernels.__file__).parent)
    assert not origin.startswith(ours), "an installed msa must not be importable as `kernels`"
    if origin == "None":  # Hugging Face's package is not installed: transformers must see nothing
        assert available == "False"


# --- what pip installs: pyproject.toml against the imports -------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
UNDECLARED = {"torch"}   # on purpose: pyproject.toml says why, and cli.main what to do without it


@pytest.fixture(scope="module")
def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads TOML")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def names(requirements: list[str]) -> set[str]:
    """Requirement strings -> their distributions' normalised names."""
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group()).lower() for r in requirements}


def imported(*folders: str) -> tuple[set[str], set[str]]:
    """The distributions that the .py files under `folders` import: (those imported when a module is, all)."""
    owners = importlib.metadata.packages_distributions()
    on_import, anywhere = set(), set()

    def visit(node: ast.AST, folder: Path, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                continue   # for annotations only: imports nothing at run time
            modules = ([a.name for a in child.names] if isinstance(child, ast.Import) else
                       [child.module] if isinstance(child, ast.ImportFrom) and child.level == 0 else [])
            for module in (m.split(".")[0] for m in modules):
                if module in sys.stdlib_module_names or (folder / f"{module}.py").exists():
                    continue   # the standard library, or a script's neighbour
                # not installed here (matplotlib outside `make setup`): its import name stands for it
                found = names(owners.get(module, [module])) - {"msa-cli"}   # msa_cli, msa_kernels: this one
                anywhere.update(found)
                if not in_function:
                    on_import.update(found)
            visit(child, folder, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                   ast.Lambda)))

    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            visit(ast.parse(path.read_text()), path.parent, False)
    return on_import, anywhere


def test_every_distribution_msa_imports_is_declared_and_every_dependency_is_imported(pyproject):
    dependencies = names(pyproject["project"]["dependencies"])
    in_extras = set().union(*map(names, pyproject["project"]["optional-dependencies"].values()))
    on_import, anywhere = imported("msa_cli", "msa_kernels")
    assert on_import - UNDECLARED <= dependencies, "a plain `pip install msa-cli` must let every module import"
    assert anywhere - UNDECLARED <= dependencies | in_extras, "what a command imports is declared somewhere"
    assert dependencies <= anywhere, f"nothing imports {dependencies - anywhere}: a download for nothing"
    assert not UNDECLARED & (dependencies | in_extras)


def test_each_extra_is_what_its_users_import(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert names(extras["test"]) <= imported("tests")[1]
    assert names(extras["bench"]) <= imported("benchmarks")[1]
    # msa never imports the gguf extra itself (transformers does, to read a GGUF): its error names exactly it.
    assert not names(extras["gguf"]) & imported("msa_cli", "msa_kernels")[1]
    assert shlex.split(loading.INSTALL_GGUF)[2:] == extras["gguf"]
    assert names(loading.GGUF_PACKAGES) == names(extras["gguf"])


def test_every_package_folder_is_installed_and_every_installed_package_exists(pyproject):
    setuptools = pyproject["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts)
               for top in ("msa_cli", "msa_kernels") for p in (ROOT / top).rglob("__init__.py")}
    assert set(setuptools["packages"]) == folders


# --- what a missing piece says -------------------------------------------------------------------------------------

def without(module: str, tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    """`msa ARGV` with `module` unimportable, as if not installed (set before anything can import it)."""
    script = (f"import sys; sys.modules[{module!r}] = None; sys.argv = ['msa', *{list(argv)!r}]; "
              f"from msa_cli.cli import main; main()")
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env=msa_env(tmp_path / "home"))


@pytest.mark.parametrize("argv", [["status"], ["ask", "anything"], ["--help"]], ids=" ".join)
def test_without_torch_msa_says_how_to_install_it_in_one_line(tmp_path, argv):
    r = without("torch", tmp_path, *argv)
    assert (r.returncode, r.stdout) == (errors.NO_MODEL, ""), r.stderr
    assert r.stderr.startswith("msa: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "pip install torch" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("package", loading.GGUF_PACKAGES)
def test_converting_a_gguf_without_the_gguf_extra_says_how_to_install_it_in_one_line(tmp_path, package):
    gguf = tmp_path / "some-model.gguf"
    gguf.write_bytes(b"GGUF not really")   # never read: the missing package is named first
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("a fact\n")
    r = without(package, tmp_path, "ingest", str(tmp_path / "docs"), "--model", str(gguf), "--bank",
                str(tmp_path / "bank"))
    assert (r.returncode, r.stdout) == (errors.NO_MODEL, ""), r.stderr
    assert r.stderr.startswith("msa: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert package in r.stderr and loading.INSTALL_GGUF in r.stderr
    assert not (tmp_path / "home" / "models").exists() and not (tmp_path / "bank").exists()
