"""The repository's ``kernels/`` folder (installed as ``accel.kernels``) must not hide Hugging Face's ``kernels``
package, which transformers >= 5.25 imports at start-up, when the repository root is on sys.path."""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_from_root(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_import_kernels_from_the_root_gets_the_installed_package():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25)")
    where = _import_from_root("import kernels; print(kernels.__file__)")
    assert not os.path.abspath(where).startswith(os.path.join(ROOT, "kernels"))


def test_accel_imports_from_the_root():
    # transformers imports `kernels` (when installed) while accel imports it; accel's own stay accel.kernels
    assert _import_from_root("import accel, accel.kernels as k; print(k.get_backend('reference').name)") == "reference"
