"""JupyterLab in a real browser: notebook 03 runs in JupyterLab driven through headless Chromium,
and moving its widget's slider changes the widget's output.

Skipped where Chromium, its driver or selenium is missing (``apt-get install chromium
chromium-driver``; ``pip install -e '.[dev]'``). JupyterLab serves a copy of ``notebooks/`` inside a
temporary folder marked as the repository (a ``pyproject.toml`` naming the project), so the
runs and figures the notebook writes stay there; the synthetic data is the repository's
(``data/``, generated on first use as the notebooks do) unless ``SCICEVPR_DATA`` says otherwise.

``SCICEVPR_BROWSER_TEST`` chooses what runs:

- unset or ``widget`` (default, 1-3 minutes on 2 cores): a copy of 03 holding only the cells the
  widget needs: the setup cell as it is, a cell that trains the teacher (capped at
  ``SCICEVPR_EPOCHS=1``, ``SCICEVPR_MAX_ITERS=1``) and computes its features, and the widget's
  cell as it is;
- ``full``: notebook 03 unchanged, every cell, the offline recipe uncapped (about 5 minutes on 2
  quiet cores; it trains the teacher and student when the copy has no runs).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "03_cross_image_instability.ipynb"
MODE_ENV = "SCICEVPR_BROWSER_TEST"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                       reason="no Chromium and chromedriver (apt-get install chromium chromium-driver)"),
]

# The widget copy's training-and-features cell: 03's model cell without the batch-size sweep.
WIDGET_MODEL_CELL = """\
teacher_run, student_run = settings.train()
teacher = teacher_run.model
label = settings.label_for(teacher)
teacher_name = "Super-CricaVPR (teacher)"
features = {teacher_name: stability_features(teacher, split, settings.eval_config(),
                                             database_batch_size=settings.eval_batch_size)}"""


def widget_copy(source: Path, target: Path) -> None:
    """``source`` (03) reduced to the cells its widget needs (module docstring); the kept cells'
    sources are 03's, but the model cell's."""
    import nbformat

    nb = nbformat.read(source, as_version=4)
    setup = next(c for c in nb.cells if c.cell_type == "code" and "nb.setup()" in c.source)
    widget = next(c for c in nb.cells if c.cell_type == "code" and "flip_explorer" in c.source)
    nb.cells = [setup, nbformat.v4.new_code_cell(WIDGET_MODEL_CELL), widget]
    for c in nb.cells:
        c.outputs, c.execution_count = [], None
    nbformat.write(nb, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """JupyterLab on a copy of the notebooks (module docstring); yields ``(url, token, folder)``."""
    mode = os.environ.get(MODE_ENV, "widget").strip() or "widget"
    if mode not in ("widget", "full"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected 'widget' (default) or 'full'")
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "scicevpr"\n')  # find_repo_root stops here
    if mode == "full":
        shutil.copy(REPO / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
        (root / "figures").mkdir()  # 03's last cell reads the committed claims table
        shutil.copy(REPO / "figures" / "claims.csv", root / "figures" / "claims.csv")
    else:
        widget_copy(REPO / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "SCICEVPR_DATA": os.environ.get("SCICEVPR_DATA") or str(REPO / "data"),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    if mode == "widget":
        env.update(SCICEVPR_EPOCHS="1", SCICEVPR_MAX_ITERS="1")
    port, token = free_port(), "scicevpr-browser-test"
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.token={token}", f"--ServerApp.root_dir={root / 'notebooks'}", "--expose-app-in-browser"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),  # e.g. in a container
        env=env, cwd=root / "notebooks", stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                    if json.loads(r.read()).get("started"):
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
            time.sleep(1)
        yield url, token, mode
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float, what: str, poll: float = 2.0):
    """Poll ``script`` (JavaScript returning a value) until it is truthy; returns the value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(poll)
    errors = driver.execute_script(
        "return Array.from(document.querySelectorAll('.jp-OutputArea-output[data-mime-type=\"application/vnd.jupyter.stderr\"]'))"
        ".map(e => e.innerText).join('\\n').slice(-3000)")
    raise TimeoutError(f"{what} not seen in {timeout:.0f} s; stderr outputs in the notebook:\n{errors}")


# JavaScript: the widget's state (its text line and image), or null while it is not rendered.
WIDGET_STATE = """
const html = document.querySelector('.jp-OutputArea .widget-html pre');
const img = document.querySelector('.jp-OutputArea .widget-image');
return html && img && img.src ? [html.innerText, img.src.length, img.src.slice(-64)] : null;"""
# The notebook's model, not its rendering: JupyterLab 4 renders only the cells near the viewport,
# so the prompts and outputs of a long notebook's other cells are not in the page.
CODE_CELLS = """
const w = window.jupyterapp.shell.currentWidget, cells = w.content.model.cells, out = [];
for (let i = 0; i < cells.length; i++) { const c = cells.get(i); if (c.type === 'code') out.push([i, c]); }
"""
KERNEL_DONE = CODE_CELLS + """
const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
return out.length > 0 && out.every(([i, c]) => c.executionCount !== null) && kernel && kernel.status === 'idle';"""
ERRORS = CODE_CELLS + """
let n = 0;
for (const [i, c] of out) for (let j = 0; j < c.outputs.length; j++) if (c.outputs.get(j).type === 'error') n++;
return n;"""
SHOW_WIDGET = CODE_CELLS + """
const found = out.find(([i, c]) => c.sharedModel.getSource().includes('flip_explorer'));
if (!found) return false;
w.content.activeCellIndex = found[0];
w.content.scrollToItem(found[0], 'center');
return true;"""


def test_notebook_03_runs_in_jupyterlab_and_its_widget_answers(lab, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, token, mode = lab
    browser.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
    wait_for(browser, "return window.jupyterapp && document.querySelector('.jp-Notebook .jp-CodeCell') !== null",
             120, "JupyterLab with the notebook open")
    wait_for(browser, "return document.querySelector('.jp-Notebook-ExecutionIndicator, .jp-KernelStatus') !== null"
                      " && window.jupyterapp.shell.currentWidget && window.jupyterapp.shell.currentWidget.sessionContext"
                      " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                      " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel !== null",
             120, "a kernel for the notebook")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    timeout = 1800 if mode == "full" else 900
    wait_for(browser, KERNEL_DONE, timeout, "every cell run", poll=5)
    assert browser.execute_script(ERRORS) == 0, "a cell raised an error"
    assert browser.execute_script(SHOW_WIDGET), "no widget cell (flip_explorer) in the notebook"
    before = wait_for(browser, WIDGET_STATE, 60, "the widget's output")
    assert before[0].startswith("top-1 ") and "alone" in before[0]

    handle = browser.find_element(By.CSS_SELECTOR, ".jp-OutputArea .widget-slider .noUi-handle")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    handle.click()
    for _ in range(3):
        handle.send_keys(Keys.ARROW_RIGHT)  # query 0 -> 3
    readout = wait_for(browser, "const r = document.querySelector('.jp-OutputArea .widget-readout');"
                                "return r && r.innerText.trim() !== '0' ? r.innerText.trim() : null;", 30, "the slider moved")
    assert int(readout) > 0
    deadline, after = time.time() + 120, before
    while after == before and time.time() < deadline:  # the kernel redraws the figure and the line
        time.sleep(2)
        after = browser.execute_script(WIDGET_STATE)
    assert after is not None and after != before, "the widget's output did not change when its slider moved"
    assert after[0].startswith("top-1 ")
