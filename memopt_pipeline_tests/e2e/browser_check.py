"""Browser check of the Dagster UI: the asset graph and an asset page render in headless Chromium.

Against a running webserver with at least one full run materialized:

    python -m memopt_pipeline_tests.e2e.browser_check --url http://127.0.0.1:3000 --out data/output/ui

For each page it takes a PNG screenshot and dumps the DOM after the page's JavaScript ran, and
fails unless the DOM shows the names it must show (an empty shell or an error page does not).

The plots on an asset page (markdown metadata entries embedding a base64 PNG) sit behind a
"[Show Markdown]" link per entry, which Chromium's command line cannot click. For those it drives
Chromium through the DevTools protocol: it clicks the entry's link, checks that the dialog holds
an <img> with a data:image/png source that decoded (naturalWidth > 0), and screenshots the dialog.

The e2e test test_servers.py runs it against its own servers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import websocket  # websocket-client: the DevTools protocol is JSON over a websocket

# CI sets this so that a missing browser fails the check instead of skipping it.
REQUIRE_BROWSER_ENV = "MEMOPT_REQUIRE_BROWSER"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# The UI is a JavaScript app that loads its data through GraphQL after the first paint; the
# virtual time budget lets Chromium run timers and requests that long before it captures.
_VIRTUAL_TIME_MS = 20_000
_TIMEOUT_SECONDS = 120
# A fresh profile each time: no cached UI state, no first-run dialogs; nothing phones home.
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,900",
)  # fmt: skip


@dataclass(frozen=True)
class Page:
    name: str
    path: str
    must_show: tuple[str, ...]  # texts the rendered DOM must contain


PAGES = (
    # The lineage of the evaluation, upstream to the end: every stage as its own node (the
    # global lineage page starts with the asset groups collapsed, showing group names only).
    Page(
        "asset_graph",
        "/assets/holdout_evaluation?view=lineage&lineageScope=upstream&lineageDepth=9",
        ("source_dataset", "dataset_metadata", "memory_plan", "gene_split", "cv_folds", "instance_model", "ensemble_model"),
    ),
    # The asset page shows the latest materialization's metadata: numbers, and the plots other
    # stages attach (the memory timeline).
    Page("holdout_evaluation", "/assets/holdout_evaluation", ("holdout_evaluation", "logloss", "peak_rss_gb")),
)


@dataclass(frozen=True)
class Plot:
    page: str  # a Page's name; the screenshot is <page>_<label>.png
    path: str
    label: str  # the markdown metadata entry holding the plot


PLOTS = (
    # memory_guard.py's stage metadata: RSS over the stage against the budget.
    Plot("holdout_evaluation", "/assets/holdout_evaluation", "memory_timeline"),
    # evaluation.py's holdout_evaluation: precision-recall curves per class.
    Plot("holdout_evaluation", "/assets/holdout_evaluation", "pr_curves"),
)
# How the UI shows a long markdown entry: a link that opens the markdown in a dialog.
_SHOW_MARKDOWN = "[Show Markdown]"
_PLOT_TIMEOUT_SECONDS = 60


class BrowserCheckError(AssertionError):
    """A page did not render what it must; the message names the page and what is missing."""


def find_chromium() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(chromium: str, url: str, *action: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="memopt-chromium-") as profile:
        command = [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={_VIRTUAL_TIME_MS}", *action, url]
        return subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_SECONDS, check=False)


def check_page(chromium: str, base_url: str, page: Page, out_dir: Path) -> Path:
    """Screenshot of ``page`` (PNG under ``out_dir``) after checking its rendered DOM."""
    url = base_url.rstrip("/") + page.path
    dom = _chromium(chromium, url, "--dump-dom")
    if dom.returncode != 0:
        raise BrowserCheckError(f"{page.name}: chromium exited with {dom.returncode} on {url}: {dom.stderr[-2000:]}")
    (out_dir / f"{page.name}.html").write_text(dom.stdout)
    missing = [text for text in page.must_show if text not in dom.stdout]
    if missing:
        raise BrowserCheckError(
            f"{page.name}: {url} rendered without {missing} (DOM of {len(dom.stdout)} characters saved as "
            f"{out_dir / (page.name + '.html')}); is a full run materialized, and is the webserver up?"
        )
    png = out_dir / f"{page.name}.png"
    shot = _chromium(chromium, url, f"--screenshot={png}")
    if shot.returncode != 0 or not png.exists():
        raise BrowserCheckError(f"{page.name}: no screenshot of {url} (exit {shot.returncode}): {shot.stderr[-2000:]}")
    if png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise BrowserCheckError(f"{page.name}: {png} is not a PNG")
    return png


# In-page helpers: the "[Show Markdown]" link in the metadata row labelled `label`, and the open
# dialog titled `label` (Blueprint dialogs; the title is the entry's label).
_JS_HELPERS = """
const showMarkdown = (label) => [...document.querySelectorAll('a, button, [role=button]')].filter((el) => {
  if (el.textContent.trim() !== %(show)s) return false;
  const row = el.closest('tr');
  return row !== null && row.cells.length > 1 && row.cells[0].textContent.trim() === label;
});
const dialogFor = (label) => [...document.querySelectorAll('[role=dialog], .bp5-dialog, .bp4-dialog')].find(
  (el) => [...el.querySelectorAll('h1, h2, h3, h4, h5, h6, [class*=header i], [class*=title i]')].some(
    (h) => h.textContent.trim() === label));
""" % {"show": json.dumps(_SHOW_MARKDOWN)}


class _DevTools:
    """Headless Chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, chromium: str, profile: str):
        self.log = Path(profile) / "chromium.log"
        with self.log.open("w") as log:
            # Own session: the browser and its helper processes form one group, ended by its id.
            self.process = subprocess.Popen(
                [chromium, *_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self._id = 0
        self.socket = None
        try:
            # Chromium writes the port it picked (first line) once the endpoint listens.
            active = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + 30
            while not (active.exists() and active.read_text().count("\n") >= 1):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise BrowserCheckError(f"chromium did not open its DevTools port: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
            port = int(active.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as response:
                targets = [t for t in json.loads(response.read()) if t["type"] == "page"]
            if not targets:
                raise BrowserCheckError(f"chromium on port {port} has no page to drive")
            # No Origin header: Chromium refuses websocket clients from other origins.
            self.socket = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        except BaseException:
            self.close()
            raise

    def call(self, method: str, **params) -> dict:
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:  # no domain is enabled, so the only other messages are stray events
            message = json.loads(self.socket.recv())
            if message.get("id") == self._id:
                if "error" in message:
                    raise BrowserCheckError(f"DevTools {method} failed: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        """Value of a JavaScript expression in the page (awaited if it is a promise)."""
        result = self.call(
            "Runtime.evaluate",
            expression=f"(() => {{ {_JS_HELPERS}\nreturn ({expression}); }})()",
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            raise BrowserCheckError(f"JavaScript failed in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        """First truthy value of ``expression``, polled; None after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        if self.socket is not None:
            try:
                self.call("Browser.close")
            except Exception:  # already gone: the group is ended below either way
                pass
            self.socket.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # helper processes left behind, if any
        except ProcessLookupError:
            pass
        self.process.wait()


def _check_plot(browser: _DevTools, plot: Plot, url: str, out_dir: Path) -> Path:
    """Open the plot's dialog, check its image decoded, and screenshot the dialog."""
    label = json.dumps(plot.label)
    what = f"{plot.page}: the {plot.label!r} entry on {url}"
    rect = browser.evaluate(f"""(() => {{
        const links = showMarkdown({label});
        if (links.length !== 1) return links.length;
        links[0].scrollIntoView({{block: 'center'}});
        const r = links[0].getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
    }})()""")
    if not isinstance(rect, dict):
        raise BrowserCheckError(f"{what}: found {rect} {_SHOW_MARKDOWN} links in metadata rows labelled {plot.label!r}, expected one")
    browser.click(rect["x"], rect["y"])  # a real click: the link must be on top and live
    image = browser.wait_for(f"""(() => {{
        const dialog = dialogFor({label});
        const img = dialog && dialog.querySelector('img');
        return img ? {{src: img.getAttribute('src').slice(0, 40)}} : null;
    }})()""", _PLOT_TIMEOUT_SECONDS)
    if not image:
        state = "no dialog opened" if not browser.evaluate(f"!!dialogFor({label})") else "its dialog holds no <img>"
        raise BrowserCheckError(f"{what}: clicked {_SHOW_MARKDOWN}, but {state} within {_PLOT_TIMEOUT_SECONDS} s")
    if not image["src"].startswith("data:image/png;base64,"):
        raise BrowserCheckError(f"{what}: the dialog's <img> is not an inline PNG (src starts {image['src']!r})")
    # decode() settles once the PNG is decoded, and rejects if it cannot be.
    decoded = browser.evaluate(f"""(() => {{
        const img = dialogFor({label}).querySelector('img');
        return img.decode().then(
            () => ({{ok: img.naturalWidth > 0, width: img.naturalWidth, height: img.naturalHeight,
                     shown: img.getBoundingClientRect().width}}),
            (error) => ({{ok: false, error: String(error), width: img.naturalWidth}}));
    }})()""")
    if not decoded["ok"] or not decoded.get("shown"):
        raise BrowserCheckError(f"{what}: the dialog's inline PNG did not decode or is not shown: {decoded}")
    box = browser.evaluate(f"""(() => {{
        const r = dialogFor({label}).getBoundingClientRect();
        return {{x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height}};
    }})()""")
    shot = browser.call("Page.captureScreenshot", format="png", clip={**box, "scale": 1}, captureBeyondViewport=True)
    png = out_dir / f"{plot.page}_{plot.label}.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    if png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise BrowserCheckError(f"{what}: {png} is not a PNG")
    # Close the dialog (Escape) so that the next entry's link is not covered.
    for kind in ("keyDown", "keyUp"):
        browser.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
    if not browser.wait_for(f"!dialogFor({label})", 10):
        raise BrowserCheckError(f"{what}: its dialog did not close on Escape")
    return png


def check_plots(chromium: str, base_url: str, plots: tuple[Plot, ...], out_dir: Path) -> list[Path]:
    """Screenshots of the plots' dialogs (PNGs under ``out_dir``), one browser for all."""
    pngs = []
    with tempfile.TemporaryDirectory(prefix="memopt-chromium-") as profile:
        browser = _DevTools(chromium, profile)
        try:
            current = None
            for plot in plots:
                url = base_url.rstrip("/") + plot.path
                if url != current:
                    browser.call("Page.navigate", url=url)
                    current = url
                    # Rendered once every entry of this page has its link (the metadata loads last).
                    labels = json.dumps([p.label for p in plots if p.path == plot.path])
                    if not browser.wait_for(f"{labels}.every((l) => showMarkdown(l).length > 0)", _PLOT_TIMEOUT_SECONDS):
                        found = browser.evaluate(
                            f"[...document.querySelectorAll('tr')].filter((r) => r.textContent.includes({json.dumps(_SHOW_MARKDOWN)}))"
                            ".map((r) => r.cells[0] && r.cells[0].textContent.trim())"
                        )
                        raise BrowserCheckError(
                            f"{plot.page}: {url} showed no {_SHOW_MARKDOWN} link for {labels} within "
                            f"{_PLOT_TIMEOUT_SECONDS} s (entries with one: {found}); is a full run materialized?"
                        )
                pngs.append(_check_plot(browser, plot, url, out_dir))
        finally:
            browser.close()
    return pngs


def dismiss_welcome_dialog(base_url: str) -> None:
    """Mark the UI's first-visit "Join the Dagster community" dialog as seen, as its Skip button
    does (GraphQL setNuxSeen); on 127.0.0.1 it would otherwise cover every screenshot."""
    request = urllib.request.Request(
        base_url.rstrip("/") + "/graphql",
        data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    if body.get("errors") or not body.get("data", {}).get("setNuxSeen"):
        raise BrowserCheckError(f"could not dismiss the UI's welcome dialog through {base_url}/graphql: {body}")


def check_pages(base_url: str, out_dir: str | Path, chromium: str | None = None) -> list[Path]:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise BrowserCheckError(f"no Chromium found (looked for {', '.join(_CANDIDATES)}); install it: apt-get install -y chromium")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dismiss_welcome_dialog(base_url)
    return [check_page(chromium, base_url, page, out) for page in PAGES] + check_plots(chromium, base_url, PLOTS, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="webserver address")
    parser.add_argument("--out", default=os.path.join("data", "output", "ui_screenshots"), help="folder for PNGs and DOM dumps")
    args = parser.parse_args(argv)
    try:
        for png in check_pages(args.url, args.out):
            print(f"rendered: {png}")
    except BrowserCheckError as error:
        print(f"browser check failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
