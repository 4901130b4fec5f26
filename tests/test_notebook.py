"""The notebook H64LM.ipynb: it mirrors h64lm.py section by section, imports the file instead of copying it, and
runs top to bottom with every check passing."""

import os
import re
import shutil

import pytest

import h64lm
from conftest import REPO

NOTEBOOK = REPO / "H64LM.ipynb"


def file_sections() -> list[str]:
    """'N. Title' of every section banner of h64lm.py (a '# N. Title' line under a '# ----' rule), in file order."""
    lines = (REPO / "h64lm.py").read_text(encoding="utf-8").splitlines()
    return [line[2:] for rule, line in zip(lines, lines[1:])
            if rule.startswith("# ----") and re.fullmatch(r"# \d+\. .+", line)]


def read_notebook():
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOK, as_version=4)


def test_notebook_has_the_sections_of_h64lm_with_their_numbers_titles_and_order():
    notebook = read_notebook()
    headings = [cell.source.splitlines()[0][3:] for cell in notebook.cells
                if cell.cell_type == "markdown" and re.match(r"## \d+\. ", cell.source)]
    assert headings == file_sections()


def notebook_code() -> str:
    return "\n".join(cell.source for cell in read_notebook().cells if cell.cell_type == "code")


def test_notebook_imports_h64lm_and_redefines_none_of_it():
    code = notebook_code()
    assert "import h64lm" in code
    defined = set(re.findall(r"^\s*(?:def|class) (\w+)", code, flags=re.MULTILINE))
    assert not defined & set(dir(h64lm)), "the notebook should import these from h64lm, not define them again"
    # Nor copy its code under another name: no three consecutive lines of h64lm.py appear in the notebook.
    ours = [line.strip() for line in (REPO / "h64lm.py").read_text(encoding="utf-8").splitlines()]
    triples = {tuple(ours[i:i + 3]) for i in range(len(ours) - 2) if all(len(s) > 12 for s in ours[i:i + 3])}
    theirs = [line.strip() for line in code.splitlines()]
    copied = [theirs[i:i + 3] for i in range(len(theirs) - 2) if tuple(theirs[i:i + 3]) in triples]
    assert copied == []


def test_the_notebook_trains_with_the_programs_own_step_and_has_no_loop_of_its_own():
    code = notebook_code()
    assert "h64lm.train_step(run, 0)" in code and "h64lm.train(config, tc" in code
    # What only a training loop of its own would write: a backward pass, an optimizer step, clipping, or
    # setting the learning rate of the optimizer's groups.
    for sign in (".backward(", "optimizer.step(", "clip_grad_norm_", "param_groups", "zero_grad("):
        assert sign not in code, sign


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Executes a copy (the committed notebook keeps its outputs); any failing cell, including a failed check,
    raises CellExecutionError with the cell's traceback."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # other tests run beside it: its kernel takes one core, not all
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # (OpenMP's threads spin on a shared core: 3x slower or more)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    copy = tmp_path / NOTEBOOK.name
    shutil.copyfile(NOTEBOOK, copy)
    notebook = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()
    nbformat.write(notebook, copy)
    outputs = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "✗" not in outputs
    assert outputs.count("✓") >= len(file_sections())
