import os
import subprocess
import sys
from pathlib import Path

import pytest

# Triton decides at decoration time whether a kernel is compiled or interpreted, so this must be
# set before any kernel module is imported. Without a GPU the kernels run in Triton's interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `msa` as a user runs it: a fresh interpreter each time, so a test sees its imports, output and exit code.
MSA = [sys.executable, "-m", "msa_cli.cli"]


def msa_env(home: str | Path | None = None, model: Path | None = None) -> dict:
    """The environment of an `msa` subprocess: this one's, with no MSA_BANK (a test names its --bank), none of
    the debugging switches MSA_DEBUG and MSA_CRASH_AT (a test that wants one sets it), and its own MSA_HOME and
    MSA_MODEL where given."""
    env = {**os.environ, "MSA_BANK": "", "MSA_DEBUG": "", "MSA_CRASH_AT": "", "MSA_HANG_AT": ""}
    if home is not None:
        env["MSA_HOME"] = str(home)
    if model is not None:
        env["MSA_MODEL"] = str(model)
    return env


# Root reads every file; dropping its overrides makes a permission real (CI runs as root too).
AS_A_USER = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


def msa(env: dict, *args: str, prefix: tuple = (), **kw) -> subprocess.CompletedProcess:
    """Run `msa ARGS...` with `env` (behind `prefix`, e.g. setpriv); stdout and stderr come back as text. A call
    that hangs fails its test after 10 minutes (timeout=, as subprocess.run takes it; some tests load the real
    model)."""
    kw.setdefault("timeout", 600)
    return subprocess.run([*prefix, *MSA, *args], capture_output=True, text=True, env=env, **kw)


def msa_here(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `msa ARGS...` in this process, through the CLI's own entry point (its exit codes, its one-line errors),
    with this process's environment: (code, stdout, stderr)."""
    from msa_cli import cli

    monkeypatch.setattr(sys, "argv", ["msa", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture
def msa_home(tmp_path, monkeypatch) -> Path:
    """An MSA_HOME of the test's own for msa called in this process: converted models, the weights-hash cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("MSA_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny test model (tests/tiny.py) saved as a local Hugging Face directory, shared by a module's tests."""
    from tiny import save_tiny_model   # here: only the modules that use this fixture load torch and transformers

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    """The tiny test model loaded in this process (float32), shared by a module's tests."""
    import torch

    from msa_cli.model.loading import load_model

    return load_model(str(tiny_model_dir), torch.float32)


@pytest.fixture(scope="module")
def tiny_env(tiny_model_dir, tmp_path_factory) -> dict:
    """A user of the tiny test model, with an MSA_HOME of their own, shared by a module's tests."""
    return msa_env(tmp_path_factory.mktemp("home"), tiny_model_dir)


def failing_reader(monkeypatch, name: str, message: str) -> None:
    """Make the reader of every file called `name` raise RuntimeError(message), as a reader's bug would, where
    ingest and training both read files (corpus/passages.py)."""
    import msa_cli.corpus.passages as passages

    real_parse = passages.parse

    def parse(path, data):
        if path.name == name:
            raise RuntimeError(message)
        return real_parse(path, data)

    monkeypatch.setattr(passages, "parse", parse)
