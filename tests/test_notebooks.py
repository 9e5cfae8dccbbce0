"""Every notebook in notebooks/ runs top to bottom without an error.

Each notebook is executed headless with nbclient in a fresh `python3` kernel whose working directory
is notebooks/ (as when it is opened there in Jupyter). The kernel is pinned to the Python running
the tests (this venv's), whatever kernelspecs the machine has installed elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _kernel_manager() -> KernelManager:
    """A `python3` kernel running sys.executable with ipykernel.

    With no kernelspec directories to search, jupyter_client falls back to ipykernel's built-in spec,
    whose command is this interpreter; a `python3` kernelspec in ~/.local/share/jupyter or elsewhere
    could otherwise point to another Python without longseq.
    """
    return KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, km=_kernel_manager(), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    failure = None
    try:
        client.execute()
    except CellExecutionError as error:
        failure = ANSI_ESCAPE.sub("", str(error))  # the cell's source and its (colored) traceback
    if failure is not None:
        pytest.fail(f"{path.name}: a cell raised\n{failure}", pytrace=False)
