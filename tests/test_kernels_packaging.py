"""lola_kernels is installed under that name from kernels/, and our folder never passes for PyPI's ``kernels``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_import_name_is_lola_kernels(tmp_path):
    """From outside the checkout: lola_kernels is our kernels/ folder and 'kernels' is not."""
    code = ("import importlib.util as u, lola_kernels; spec = u.find_spec('kernels'); "
            "print(lola_kernels.__file__); print(spec.origin if spec else None)")
    lola_file, kernels_origin = _python(code, tmp_path).splitlines()
    assert Path(lola_file).resolve() == ROOT / "kernels" / "__init__.py"
    assert kernels_origin == "None" or not Path(kernels_origin).resolve().is_relative_to(ROOT)


def test_folder_is_inert_under_the_name_kernels():
    """From the checkout root (on sys.path there) transformers' probe imports kernels/ by folder name: it must
    not import triton or register anything, and transformers must not think the hub 'kernels' is usable."""
    code = ("import sys, importlib.util as u; origin = u.find_spec('kernels').origin\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "print(origin, is_kernels_available(), 'triton' in sys.modules, 'lola_kernels' in sys.modules)")
    origin, available, triton_loaded, lola_loaded = _python(code, ROOT).split()
    assert Path(origin).resolve() == ROOT / "kernels" / "__init__.py"  # the shadowing this test is about
    assert (available, triton_loaded, lola_loaded) == ("False", "False", "False")
