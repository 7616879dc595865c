"""The notebooks run: each is executed on CPU with the small test size (`nbclient`, a fresh
`ipykernel`), the committed copies carry the outputs of a real run with no errors, and the first
cell installs jmoe from the URL the user sets, or skips where jmoe is installed. The Hugging Face
notebook's run also shows the imported fixture's logits matching transformers' and the null
experts cutting the true experts per token."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
IDS = [path.name for path in NOTEBOOKS]


def _outputs_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []))


def test_there_are_notebooks():
    names = {path.name for path in NOTEBOOKS}
    assert {"quickstart.ipynb", "routers.ipynb", "huggingface.ipynb"} <= names


def _check_huggingface(notebook) -> None:
    text = "".join(_outputs_text(cell) for cell in notebook.cells)
    difference = float(re.search(r"max \|difference\| (\S+)", text).group(1))
    assert difference < 1e-4  # float32 logits against the fixture's transformers logits
    before, after = (float(n) for n in re.findall(r"([\d.]+) true experts per token", text))
    assert before == 2.0 and after < before  # k=2 at first, then the null experts take slots


CHECKS = {"huggingface.ipynb": _check_huggingface}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_on_cpu_at_the_test_size(path, monkeypatch):
    monkeypatch.setenv("JMOE_NOTEBOOK_SIZE", "test")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": path.parent}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    install, size = notebook.cells[1], notebook.cells[2]
    assert "jmoe is already installed" in _outputs_text(install)
    assert "size: test" in _outputs_text(size)
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2  # the plots were drawn
    CHECKS.get(path.name, lambda notebook: None)(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_carries_outputs_of_a_run(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), "execute it top to bottom and save it"
    outputs = [out for cell in code for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 2
    CHECKS.get(path.name, lambda notebook: None)(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_install_cell_installs_from_the_url_the_user_sets(path, monkeypatch):
    """The first cell's logic in a runtime without jmoe: no URL is a clear error; a URL becomes
    one pip install of `jmoe[extra] @ URL`, the extra matching the accelerator."""
    source = nbformat.read(path, as_version=4).cells[1].source
    assert 'JMOE_URL = ""' in source
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "jmoe" else real_find_spec(name)
    )
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda command: calls.append(command))
    for variable in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(RuntimeError, match="set JMOE_URL"):
        exec(source, {})
    url = "git+https://example.org/jmoe.git"
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    exec(source.replace('JMOE_URL = ""', f"JMOE_URL = {url!r}"), {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", f"jmoe[tpu] @ {url}"]]
