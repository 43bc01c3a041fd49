import subprocess
import sys
from pathlib import Path

import msa_kernels

PROBE = """
import importlib.util, transformers.utils
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec else None)
print(transformers.utils.is_kernels_available())
"""


def test_our_kernels_install_as_msa_kernels():
    assert Path(msa_kernels.__file__).parent.name == "kernels"


def test_our_kernels_do_not_shadow_hugging_faces_kernels_package(tmp_path):
    # transformers probes for Hugging Face's `kernels` distribution; an installed msa must not provide one.
    # Run where a user would (not the repo root, whose `kernels/` folder is on sys.path only there).
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    origin, available = out
    ours = str(Path(msa_kernels.__file__).parent)
    assert not origin.startswith(ours), "an installed msa must not be importable as `kernels`"
    if origin == "None":  # Hugging Face's package is not installed: transformers must see nothing
        assert available == "False"
