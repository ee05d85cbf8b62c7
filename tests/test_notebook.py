"""notebooks/kvjax_tpu.ipynb runs on a CPU with 8 forced host devices, as on a Colab TPU v2-8.

Its code cells run in order in one process (shell lines, the install step, left out: this
environment has kvjax installed), with the cell tagged `parameters` given small values, as
papermill injects them: the notebook's own numbers are for a TPU.
"""

import json
import os
import subprocess
import sys

import pytest

from kvjax.data import DATA_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "kvjax_tpu.ipynb")
SMALL = "CONTEXT = 256\nSTEPS = 1\n"


def program(path: str) -> str:
    """The notebook's code cells as one script: `!` lines dropped, the parameters cell replaced."""
    cells = [c for c in json.load(open(path))["cells"] if c["cell_type"] == "code"]
    parts = []
    for cell in cells:
        source = "".join(cell["source"])
        if "parameters" in cell["metadata"].get("tags", []):
            source = SMALL
        parts.append("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("!")))
    return "\n\n".join(parts)


def test_the_parameters_cell_is_tagged_and_the_install_is_a_shell_line():
    cells = [c for c in json.load(open(NOTEBOOK))["cells"] if c["cell_type"] == "code"]
    assert any("parameters" in c["metadata"].get("tags", []) for c in cells)
    assert "".join(cells[0]["source"]).startswith("!pip install")


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA_DIR, "gutenberg")),
                    reason=f"needs the shared data folder ({DATA_DIR}; set KVJAX_DATA)")
def test_the_notebook_runs_on_eight_cpu_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "KVJAX_DATA": DATA_DIR, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", program(NOTEBOOK)], env=env, capture_output=True, text=True,
                            timeout=1200, cwd=tmp_path)  # where it writes its allocation
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 cpu devices" in result.stdout and "my allocation: perplexity" in result.stdout, result.stdout[-2000:]
