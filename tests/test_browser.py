"""The three notebooks in JupyterLab, in a real browser: Debian's headless Chromium, driven by Selenium.

Copies of notebooks/ (outputs stripped, the parameters cell set to the smoke profile and an ``output_dir``
under the test's temporary folder, so nothing under outputs/ changes but the screenshot) are opened one
after another in a JupyterLab started on loopback; each one is run with the menu's Run > Run All Cells, as
a reader would. The test asserts that every code cell ran in order, that no cell shows an error or
stderr, and that every figure the smoke references in tests/nbval hold is drawn in the page (an ``img``
with a decoded, non-empty bitmap). A small control notebook with a figure, a stderr line and an
exception is run first, so a detector that could not see an error or a figure fails the test.
03's page, at its accuracy-versus-latency figure, is saved as outputs/screenshots/03_compare_jupyterlab.png.

CI installs the browser (`.ci/run`: Debian's chromium and chromium-driver); without it the test is skipped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("01_baseline_benchmark", "02_distill", "03_compare")
REFERENCES = REPO / "tests" / "nbval"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO / "outputs" / "screenshots" / "03_compare_jupyterlab.png"
TOKEN = "kdlib-browser-test"
SERVER_START_TIMEOUT = 120  # seconds for JupyterLab to answer on its port
PAGE_TIMEOUT = 120  # seconds for a notebook page to load and its kernel to start
RUN_TIMEOUT = 900  # seconds for one notebook's Run All Cells (the smoke profile's whole notebook)
# Chromium as root on a machine without outside network: no sandbox, no GPU, no background connections.
CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1400,1050",
)
# JupyterLab user settings: every cell in the DOM (no virtual scrolling), no news or update toasts.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
        ".ci/run installs them, or: apt-get install chromium chromium-driver",
    ),
]

# What the page shows of the active notebook: the input prompts of its code cells, its errors, its
# stderr and its figures. JupyterLab renders an exception's traceback and a stderr stream alike (a
# jp-RenderedText output with the stderr MIME type); the traceback is told apart by its text.
PAGE_STATE_JS = """
const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
if (!panel) { return null; }
const cells = [...panel.querySelectorAll('.jp-Notebook .jp-CodeCell')];
const text = (el) => el.textContent.trim().slice(0, 2000);
const stderr = [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')];
return {
  prompts: cells.map(c => text(c.querySelector('.jp-InputArea-prompt'))),
  errors: stderr.filter(el => /Traceback|Error/.test(el.textContent)).map(text),
  stderr: stderr.map(text),
  images: [...panel.querySelectorAll('.jp-OutputArea-output img')].map(
    img => ({complete: img.complete, width: img.naturalWidth, height: img.naturalHeight})),
};
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(base: str, route: str, method: str = "GET") -> Any:
    """One call of the Jupyter server's REST API on loopback."""
    request = urllib.request.Request(f"{base}{route}", method=method, headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """``check()`` once it is truthy; a clear failure naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last state: {last!r:.2000})")


def smoke_copy(source: Path, target: Path, output_dir: Path) -> None:
    """``source`` without outputs, its parameters cell on the smoke profile writing under ``output_dir``."""
    nb = nbformat.read(source, as_version=4)
    params = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(params) == 1, f"{source.name}: needs exactly one parameters cell"
    cell = params[0]
    new, count = re.subn(r'^profile = "[^"]*"', 'profile = "smoke"', cell.source, flags=re.M)
    new, count_overrides = re.subn(r"^overrides = None", f"overrides = {{'output_dir': {str(output_dir)!r}}}",
                                   new, flags=re.M)
    assert count == count_overrides == 1, f"{source.name}: the parameters cell must set `profile` and `overrides`"
    cell.source = new
    for code in (c for c in nb.cells if c.cell_type == "code"):
        code.outputs, code.execution_count = [], None
    nbformat.write(nb, target)


def control_notebook(target: Path) -> None:
    """A figure, a stderr line and an exception: what the page checks must see."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0]);"),
        nbformat.v4.new_code_cell("import sys\nprint('a warning line', file=sys.stderr)"),
        nbformat.v4.new_code_cell("1 / 0"),
    ]
    nbformat.write(nb, target)


def expected_figures(name: str) -> int:
    """How many figures the smoke reference of notebook ``name`` holds (tests/nbval)."""
    nb = nbformat.read(REFERENCES / f"{name}.ipynb", as_version=4)
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """JupyterLab on 127.0.0.1 serving smoke copies of the notebooks; killed at the end whatever happens."""
    root = tmp_path_factory.mktemp("browser")
    notebooks, home = root / "notebooks", root / "jupyter"
    notebooks.mkdir()
    for name in NOTEBOOKS:
        smoke_copy(REPO / "notebooks" / f"{name}.ipynb", notebooks / f"{name}.ipynb", root / "outputs")
    control_notebook(notebooks / "00_control.ipynb")
    settings = home / "lab-settings"
    for relative, values in LAB_SETTINGS.items():
        (settings / relative).parent.mkdir(parents=True, exist_ok=True)
        (settings / relative).write_text(json.dumps(values))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1", "KDLIB_PROGRESS": "off",
        "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython"),
        "MPLCONFIGDIR": str(home / "matplotlib"),
    }
    env.pop("KDLIB_DATA", None)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (root / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={notebooks}",
         "--LabApp.news_url=", "--LabApp.extension_manager=readonly", "--ServerApp.terminals_enabled=False",
         *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=notebooks, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )

    def answering() -> bool:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}: {(root / 'jupyterlab.log').read_text()[-3000:]}")
        try:
            return api(base, "/api/status") is not None
        except OSError:
            return False

    try:
        wait_for("JupyterLab to answer", answering, SERVER_START_TIMEOUT)
        yield {"base": base, "root": root, "log": root / "jupyterlab.log"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)  # the server and the kernels it started
            server.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def browser(lab: dict[str, Any]) -> Iterator[Any]:
    """Headless Chromium from Debian, through Debian's chromedriver (Selenium downloads nothing)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={lab['root'] / 'chromium-profile'}")
    os.environ.setdefault("SE_OFFLINE", "true")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def kernels_idle(base: str) -> bool:
    kernels = api(base, "/api/kernels")
    return bool(kernels) and all(k["execution_state"] == "idle" for k in kernels)


def shut_down_kernels(base: str) -> None:
    """End every session's kernel: one kernel at a time on a small machine."""
    for session in api(base, "/api/sessions"):
        api(base, f"/api/sessions/{session['id']}", "DELETE")


def run_all_cells(driver: Any, lab: dict[str, Any], name: str, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Open ``name`` in JupyterLab, click Run > Run All Cells, and return the page's state once every code
    cell has run or one failed (a failed cell stops Run All; the cells after it keep an empty prompt)."""
    from selenium.webdriver.common.by import By

    base = lab["base"]
    driver.get(f"{base}/lab/tree/{name}.ipynb?token={TOKEN}&reset")
    state = wait_for(f"{name} to open", lambda: driver.execute_script(PAGE_STATE_JS), PAGE_TIMEOUT)
    assert state["prompts"], f"{name}: the page shows no code cell"
    wait_for(f"{name}'s kernel to start", lambda: kernels_idle(base), PAGE_TIMEOUT)
    driver.find_element(By.XPATH, "//li[contains(@class,'lm-MenuBar-item')][.//*[normalize-space()='Run']]").click()
    run_all = ("//li[contains(@class,'lm-Menu-item')][.//*[contains(@class,'lm-Menu-itemLabel')]"
               "[normalize-space()='Run All Cells']]")
    wait_for("Run > Run All Cells", lambda: driver.find_elements(By.XPATH, run_all), 10)[0].click()

    def finished() -> dict[str, Any] | None:
        state = driver.execute_script(PAGE_STATE_JS)
        if state is None or any(p in ("", "[ ]:") for p in state["prompts"][:1]) or "[*]:" in state["prompts"]:
            return None
        return state if kernels_idle(base) else None

    started = time.monotonic()
    state = wait_for(f"{name}'s cells to run", finished, timeout, interval=2)
    state["seconds"] = time.monotonic() - started
    return state


def test_page_checks_see_an_error_stderr_and_a_figure(lab, browser):
    state = run_all_cells(browser, lab, "00_control", timeout=120)
    assert state["prompts"] == ["[1]:", "[2]:", "[3]:"]
    assert len(state["errors"]) == 1 and "ZeroDivisionError" in state["errors"][0]
    assert any("a warning line" in text for text in state["stderr"])
    assert [img["width"] > 0 and img["complete"] for img in state["images"]] == [True]
    shut_down_kernels(lab["base"])


def save_screenshot(driver: Any, path: Path) -> None:
    """The active notebook at its first figure's section, the file browser closed, as a PNG at ``path``."""
    from selenium.webdriver.common.by import By

    for tab in driver.find_elements(By.CSS_SELECTOR, ".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current"):
        tab.click()  # a click on the open side panel's tab collapses it
    time.sleep(1)  # the notebook is laid out again at its new width before it is scrolled
    driver.execute_script(
        "const img = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output img');"
        "img.closest('.jp-Cell').previousElementSibling.scrollIntoView({block: 'start'});"
    )
    time.sleep(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(path)), f"could not write {path}"


@pytest.fixture(scope="module")
def notebook_runs(lab: dict[str, Any], browser: Any) -> dict[str, dict[str, Any]]:
    """The page state of each notebook after Run All Cells, run in order (02 reads what 01 saved, 03 both)."""
    started, states = time.monotonic(), {}
    for name in NOTEBOOKS:
        states[name] = run_all_cells(browser, lab, name)
        if name == "03_compare" and states[name]["images"] and not states[name]["stderr"]:
            save_screenshot(browser, SCREENSHOT)  # only of a page that ran: the committed one stays otherwise
            states[name]["screenshot_at"] = SCREENSHOT.stat().st_mtime
        shut_down_kernels(lab["base"])
        print(f"\n{name}: Run All Cells took {states[name]['seconds']:.0f} s", end="")
    print(f"\nthe three notebooks in JupyterLab: {time.monotonic() - started:.0f} s")
    return states


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab_without_errors_and_draws_every_figure(notebook_runs, name):
    state = notebook_runs[name]
    assert state["errors"] == [], f"{name}: a cell failed in JupyterLab:\n" + "\n\n".join(state["errors"])
    assert state["stderr"] == [], f"{name}: cells wrote to stderr:\n" + "\n\n".join(state["stderr"])
    assert state["prompts"] == [f"[{i}]:" for i in range(1, len(state["prompts"]) + 1)], (
        f"{name}: every code cell runs once, in order: {state['prompts']}"
    )
    figures = expected_figures(name)
    assert figures > 0, f"tests/nbval/{name}.ipynb holds no figure: run `make nbval-refs`"
    drawn = [img for img in state["images"] if img["complete"] and img["width"] > 0 and img["height"] > 0]
    assert len(drawn) == len(state["images"]) == figures, (
        f"{name}: {len(drawn)} of {len(state['images'])} images drawn, the smoke reference has {figures}"
    )


def test_the_screenshot_of_03_is_saved(notebook_runs):
    assert "screenshot_at" in notebook_runs["03_compare"], f"03 did not run cleanly: {SCREENSHOT} is not rewritten"
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") >= 1000, f"{SCREENSHOT}: not a page"
