"""The files msa keeps beside models: the weights-hash cache survives damage, and a killed GGUF conversion leaves
nothing behind for long."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import torch

import msa_cli.model.loading as loading
from msa_cli.model.loading import converted_gguf, load_model
from tiny import save_tiny_model


def test_a_damaged_weights_hash_cache_is_rebuilt_not_fatal(tmp_path, msa_home):
    model_dir = save_tiny_model(tmp_path / "model")
    first = load_model(str(model_dir), torch.float32).identity["weights_sha256"]
    cache = tmp_path / "home" / "weights-hashes.json"
    for damage in ("{\"half\": ", "[1, 2]", "\0\0\0", ""):
        cache.write_text(damage)   # e.g. a concurrent writer's half-written file, from before writes were atomic
        assert load_model(str(model_dir), torch.float32).identity["weights_sha256"] == first
        assert len(json.loads(cache.read_text())) == 1
    assert [p.name for p in cache.parent.iterdir()] == ["weights-hashes.json"], "no temporary file is left"


CONVERT_FOREVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import msa_cli.model.loading as loading

    def convert(gguf, out):
        (out / "model.safetensors").write_bytes(b"\\0" * 100_000)   # half a conversion
        print("converting", flush=True)
        time.sleep(600)

    loading._convert = convert
    loading.converted_gguf(Path(sys.argv[1]))
""")


def test_a_killed_conversion_is_cleaned_up_by_the_next_one(tmp_path, msa_home, monkeypatch):
    gguf = tmp_path / "some-model.gguf"
    gguf.write_bytes(b"GGUF not really")
    proc = subprocess.Popen([sys.executable, "-c", CONVERT_FOREVER, str(gguf)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MSA_HOME": str(tmp_path / "home")})
    assert proc.stdout.readline() == "converting\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    models = tmp_path / "home" / "models"
    assert [p.name.startswith(".converting-") for p in models.iterdir() if p.is_dir()] == [True]

    def convert(gguf, out):
        (out / "msa-model.json").write_text("{}")

    monkeypatch.setattr(loading, "_convert", convert)
    target = converted_gguf(gguf)
    assert (target / "msa-model.json").is_file()
    assert [p.name for p in models.iterdir() if p.is_dir()] == [target.name], "the leftover is gone"
