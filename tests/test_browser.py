"""A chapter notebook in a real browser: JupyterLab + headless Chromium, driven by Playwright.

The nbval suite runs every chapter in a bare kernel; this test checks what a student sees:
the student edition opens in JupyterLab, Run All finishes without a traceback (exercise cells
only say "not attempted yet"), and moving a slider of the Play panel redraws its plotly figure.

Needs Debian's chromium (/usr/bin/chromium, or `chromium` on PATH) and the `playwright` Python
package; it never downloads a browser (`playwright install` is not used). Run it with
`pytest -m browser tests/test_browser.py`. On failure a screenshot and the JupyterLab log are
left in pytest's tmp_path (the message names them).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The student editions the test opens (paths relative to the repository root).
NOTEBOOKS = ["notebooks/01-roofline.ipynb"]

# Generous: 2 shared CPU cores, JupyterLab's first page load and a ~1 min notebook.
SERVER_START_S = 120
PAGE_LOAD_S = 180
KERNEL_READY_S = 180
RUN_ALL_S = 600
REDRAW_S = 60
SLIDER_STEPS = 3

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# JupyterLab user settings for the test's private settings folder: never write the notebook
# back (autosave would save outputs and widget state into notebooks/), keep every cell in the
# DOM (windowing would hide off-screen outputs), and no news / update toasts over the page.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def _chromium() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(_chromium() is None, reason="no chromium browser (/usr/bin/chromium or `chromium` on PATH); "
                       "install Debian's package: apt-get install -y chromium"),
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _api(base: str, token: str, path: str, method: str = "GET", timeout: float = 5.0):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def _die_with_parent() -> None:
    """Linux: SIGKILL the server if pytest itself is killed (its kernels then exit on their own)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextmanager
def jupyterlab(root_dir: Path, work: Path):
    """A JupyterLab server on a free 127.0.0.1 port serving root_dir; yields (base_url, token, log).

    Its runtime, config, data and settings folders live under `work`, so the user's own Jupyter
    set-up is neither read nor written. The server and its kernels are stopped on exit.
    """
    port, token = _free_port(), secrets.token_hex(16)
    settings = work / "lab-user-settings"
    for plugin, values in LAB_SETTINGS.items():
        target = settings / f"{plugin}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))
    env = dict(os.environ)
    for var in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
        env[var] = str(work / var.lower())
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    env.setdefault("LABKIT_DEVICE", "cpu")  # the CPU profile, like the nbval suite
    cmd = [
        sys.executable, "-m", "jupyterlab",
        f"--ServerApp.root_dir={root_dir}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0", "--ServerApp.open_browser=False", f"--IdentityProvider.token={token}",
        f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={work / 'lab-workspaces'}",
        # JupyterLab checkpoints a notebook when it opens it: keep that out of the repository.
        f"--FileCheckpoints.checkpoint_dir={work / 'checkpoints'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = work / "jupyterlab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} before serving; log {log}:\n{_tail(log)}")
            try:
                _api(base, token, "/api/status")
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not answer on {base} within {SERVER_START_S} s; "
                                f"log {log}:\n{_tail(log)}")
                time.sleep(0.5)
        yield base, token, log
    finally:
        _stop(proc, base, token)


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Shut kernels and server down politely, then by signal; never leave a process behind."""
    if proc.poll() is None:
        try:
            for kernel in _api(base, token, "/api/kernels") or []:
                _api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE", timeout=20)
        except (urllib.error.URLError, OSError, ValueError):
            pass
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
    # The server's session also holds any kernel it did not reap: end the whole group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- what the page shows -------------------------------------------------------------------

# Per code cell: its prompt ("[3]:", "[*]:", "[ ]:") and whether it has any source.
_CELLS_JS = """
() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')].map(c => ({
    prompt: (c.querySelector('.jp-InputArea-prompt')?.textContent || '').trim(),
    source: (c.querySelector('.jp-InputArea-editor .cm-content')?.textContent || '').trim(),
}))
"""

# Text of every stderr output that is an exception: JupyterLab shows error outputs (tracebacks)
# under the stderr mime type; warnings and progress text there do not count. (A student edition's
# unattempted exercise prints "not attempted yet" on stdout and does not raise.)
_TRACEBACKS_JS = """
() => [...document.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
    .map(e => e.textContent).filter(t => /Traceback|^\\s*\\w*(Error|Exception|Interrupt)\\b/m.test(t))
"""

# Widgets that failed to load or render (ipywidgets draws an error view in their place).
_WIDGET_ERRORS_JS = """
() => [...document.querySelectorAll('.jp-OutputArea-output')]
    .filter(e => e.querySelector('.jupyter-widgets-error-widget')
                 || /^Error displaying widget/.test(e.textContent.trim()))
    .map(e => e.textContent.trim().slice(0, 500))
"""

# The Play panel: the innermost widget box holding both a plotly figure and a slider.
_PANEL_JS = """
() => {
    const boxes = [...document.querySelectorAll('.jp-OutputArea-output .widget-box')].filter(b =>
        b.querySelector('.js-plotly-plot') && b.querySelector('.widget-slider .noUi-handle'));
    const inner = boxes.filter(b => !boxes.some(o => o !== b && b.contains(o)));
    inner.forEach((b, i) => b.setAttribute('data-labkit-panel', String(i)));
    return inner.length;
}
"""

# A signature of what the panel's figure draws: paths (lines, markers, bars) and texts.
_FIGURE_JS = """
(panel) => {
    const plot = panel.querySelector('.js-plotly-plot');
    if (!plot) return null;
    const parts = [...plot.querySelectorAll('svg.main-svg path, svg.main-svg text')]
        .filter(e => !e.closest('.hoverlayer'))
        .map(e => e.tagName + ':' + (e.getAttribute('d') || '') + (e.getAttribute('transform') || '') + e.textContent);
    return parts.join('|');
}
"""


def _kernel_idle(page) -> bool:
    return page.evaluate("""() => {
        const status = [...document.querySelectorAll('.jp-StatusBar-TextItem')].map(e => e.textContent).join(' ');
        return /\\|\\s*Idle/.test(status);
    }""")


def _wait(page, what: str, predicate, timeout_s: float, interval_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        page.wait_for_timeout(interval_s * 1000)


def _run_notebook(page, url: str, notebook: str) -> dict:
    """Open the notebook, Run All, move the Play panel's slider; returns timings in seconds."""
    timings, t0 = {}, time.monotonic()
    page.goto(url, wait_until="domcontentloaded", timeout=PAGE_LOAD_S * 1000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook .jp-Cell", timeout=PAGE_LOAD_S * 1000)
    _wait(page, "the kernel to start (status bar 'Python 3 (ipykernel) | Idle')",
          lambda: _kernel_idle(page), KERNEL_READY_S)
    timings["open"] = time.monotonic() - t0

    # Run > Run All Cells, through the menu bar as a student would.
    t0 = time.monotonic()
    before = [c["prompt"] for c in page.evaluate(_CELLS_JS)]
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

    # Run All is over when no cell waits or runs ("[*]") and the kernel is idle, twice in a row
    # (a cell that raises stops it early: the cells after it go back to "[ ]").
    quiet = 0

    def finished():
        nonlocal quiet
        cells = page.evaluate(_CELLS_JS)
        ran = [c["prompt"] for c in cells] != before
        quiet = quiet + 1 if ran and not any(c["prompt"] == "[*]:" for c in cells) and _kernel_idle(page) else 0
        return cells if quiet >= 2 else None

    try:
        cells = _wait(page, f"Run All in {notebook} to finish", finished, RUN_ALL_S)
    except AssertionError as exc:
        cells = [c for c in page.evaluate(_CELLS_JS) if c["source"]]
        done = sum(c["prompt"] not in ("[*]:", "[ ]:", "") for c in cells)
        raise AssertionError(f"{exc} ({done}/{len(cells)} code cells have run)") from None
    timings["run_all"] = time.monotonic() - t0
    page.wait_for_timeout(1000)  # let the last outputs and widget views render

    tracebacks = page.evaluate(_TRACEBACKS_JS)
    if tracebacks:
        raise AssertionError(f"{notebook}: a cell raised under Run All:\n{tracebacks[0][-3000:]}")
    not_run = [i for i, c in enumerate(cells, 1) if c["source"] and not c["prompt"].strip("[]:").isdigit()]
    if not_run:
        raise AssertionError(f"{notebook}: Run All left code cells {not_run} (counting every code cell "
                             f"from 1) without an execution count")
    broken = page.evaluate(_WIDGET_ERRORS_JS)
    if broken:
        raise AssertionError(f"{notebook}: a widget did not render: {broken[0]!r}")
    _wait(page, "a Play panel (a widget box with a plotly figure and a slider)",
          lambda: page.evaluate(_PANEL_JS), REDRAW_S)

    # Move the first slider of the first Play panel and watch its figure redraw.
    t0 = time.monotonic()
    panel = page.locator('[data-labkit-panel="0"]')
    panel.scroll_into_view_if_needed()
    _wait(page, "the Play panel's figure to draw", lambda: panel.evaluate(_FIGURE_JS), REDRAW_S)
    before = panel.evaluate(_FIGURE_JS)
    handle = panel.locator(".widget-slider .noUi-handle").first
    value_before = handle.get_attribute("aria-valuenow")
    handle.focus()
    key = "ArrowRight"
    if handle.get_attribute("aria-valuenow") == handle.get_attribute("aria-valuemax"):
        key = "ArrowLeft"  # already at its maximum
    for _ in range(SLIDER_STEPS):
        handle.press(key)
        page.wait_for_timeout(200)
    value_after = handle.get_attribute("aria-valuenow")
    if value_after == value_before:
        raise AssertionError(f"{key} on the focused slider handle did not move it (value stayed {value_before})")
    _wait(page, f"the figure to change after moving the slider from {value_before} to {value_after}",
          lambda: panel.evaluate(_FIGURE_JS) not in (None, before), REDRAW_S, interval_s=0.25)
    timings["redraw"] = time.monotonic() - t0
    return timings


def _check_notebook_in_lab(root_dir: Path, notebook: str, tmp_path: Path) -> dict:
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    path = root_dir / notebook
    assert path.is_file(), f"{notebook} is missing: build the student editions with `labkit student`"
    original = path.read_bytes()
    work = tmp_path / "lab"
    work.mkdir()
    screenshot = tmp_path / "failure.png"
    try:
        with jupyterlab(root_dir, work) as (base, token, log), sync_api.sync_playwright() as pw:
            # A persistent context is how Playwright takes a fresh --user-data-dir of our choosing.
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=_chromium(), headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000})
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                try:
                    return _run_notebook(page, f"{base}/lab/tree/{notebook}?reset&token={token}", notebook)
                except Exception as exc:
                    try:
                        page.screenshot(path=str(screenshot), full_page=True)
                    except Exception:  # noqa: BLE001 - the page may be gone; the message matters more
                        pass
                    message = (f"{exc}\n  screenshot: {screenshot}\n  JupyterLab log: {log}\n"
                               f"  page errors: {errors[:3]}\n  log tail:\n{_tail(log, 15)}")
                    if isinstance(exc, AssertionError):
                        raise AssertionError(message) from None
                    raise AssertionError(message) from exc
            finally:
                browser.close()
    finally:
        # JupyterLab must not have saved outputs or widget state into the student edition.
        if path.read_bytes() != original:
            path.write_bytes(original)
            pytest.fail(f"{notebook} was modified while open in JupyterLab (restored it)")


@pytest.mark.timeout(SERVER_START_S + PAGE_LOAD_S + KERNEL_READY_S + RUN_ALL_S + 4 * REDRAW_S)
@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs_and_play_panel_redraws(notebook, tmp_path):
    timings = _check_notebook_in_lab(ROOT, notebook, tmp_path)
    print(f"{notebook}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
