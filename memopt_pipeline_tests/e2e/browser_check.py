"""Browser check of the Dagster UI: pages, plot dialogs and the Launchpad render in headless Chromium.

Against a running webserver with at least one full run materialized:

    python -m memopt_pipeline_tests.e2e.browser_check --url http://127.0.0.1:3000 --out data/output/ui

It drives one headless Chromium through the DevTools protocol (JSON over a websocket) and waits
on page state, never for a fixed time: each check polls the page's DOM until what it expects is
there (or fails after a timeout, naming what is missing), and takes its screenshot once the page
has stopped changing and no transition is running.

- Pages: the asset lineage and holdout_evaluation's page must show the names they must show (an
  empty shell or an error page does not); a PNG and the DOM after the page's JavaScript ran.
- Plots: the plots on asset pages are markdown metadata entries embedding base64 PNGs, behind a
  "[Show Markdown]" link per entry. For every such entry of every guarded stage (the memory
  timeline on dataset_metadata, feature_screening, each instance_model partition,
  holdout_evaluation, shap_summary; PR and calibration curves; SHAP importance and beeswarm; the
  run report's key plots) it clicks the link, checks that every <img> in the dialog is an inline
  PNG that decoded and is at least MIN_PLOT_WIDTH_PX wide at its own size, and screenshots the
  dialog.
- Launchpad: full_training's Launchpad must come pre-filled with the chain settings (the
  chain_settings resource: folds, instance_model with max_rounds, SHAP) and memory_guard's
  budget_gb, show them on screen, and validate without errors; a PNG of it.

The e2e test test_servers.py runs it against its own servers.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client: the DevTools protocol is JSON over a websocket
import yaml

# CI sets this so that a missing browser fails the check instead of skipping it.
REQUIRE_BROWSER_ENV = "MEMOPT_REQUIRE_BROWSER"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# A fresh profile each time: no cached UI state, no first-run dialogs; nothing phones home.
_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,900",
)  # fmt: skip
_VIEWPORT = (1400, 900)
# How long a page may take to show what it must (the UI loads its data through GraphQL after the
# first paint), and to stop changing after that.
_LOAD_TIMEOUT_SECONDS = 60
_SETTLE_TIMEOUT_SECONDS = 20
_SETTLED_FOR_SECONDS = 1.0
_PLOT_TIMEOUT_SECONDS = 30
# Room around a dialog captured in a window made taller for it (Blueprint centres it with a 30 px margin).
_DIALOG_MARGIN_PX = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The plots are drawn about 800 px wide (core/report/plots.py) so that their text is as large as
# the UI's; the dialog shows an image at its own size. Narrower ones are unreadable or missized.
MIN_PLOT_WIDTH_PX = 600


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
class PlotPage:
    """An asset page and its markdown metadata entries that hold plots (one dialog each)."""

    name: str  # the screenshots are <name>_<label>.png
    path: str
    labels: tuple[str, ...]


# memory_guard.py's MemoryGuard.metadata: ``memory_timeline`` on every guarded stage (csv_ingest's
# on source_dataset only when a CSV is ingested, which the test's run does not).
_TIMELINE = "memory_timeline"
# Partitioned assets: the partition's own materialization, on the asset's Partitions tab.
INSTANCE_PARTITIONS = ("instance_0", "instance_1")


def plot_pages(instance_partitions: tuple[str, ...] = INSTANCE_PARTITIONS) -> tuple[PlotPage, ...]:
    """Every asset page of a full run with plots in its metadata, and their entries."""
    return (
        PlotPage("dataset_metadata", "/assets/dataset_metadata", (_TIMELINE,)),
        PlotPage("feature_screening", "/assets/feature_screening", (_TIMELINE,)),
        *(
            PlotPage(f"instance_model_{partition}", f"/assets/instance_model?view=partitions&partition={partition}", (_TIMELINE,))
            for partition in instance_partitions
        ),
        # evaluation.py's holdout_evaluation: precision-recall and calibration curves per class.
        PlotPage("holdout_evaluation", "/assets/holdout_evaluation", (_TIMELINE, "pr_curves", "calibration_curve")),
        # evaluation.py's shap_summary: mean |SHAP| per feature, and the beeswarm.
        PlotPage("shap_summary", "/assets/shap_summary", (_TIMELINE, "shap_importance", "shap_beeswarm")),
        # report.py's run_report: stage peaks, PR curves and SHAP importance in one entry.
        PlotPage("run_report", "/assets/run_report", ("key_plots",)),
    )


PLOT_PAGES = plot_pages()


@dataclass(frozen=True)
class Launchpad:
    name: str
    path: str  # /locations/<location>/jobs/<job>/playground ("<repo>@<location>" for a named repository)
    must_show: tuple[str, ...]  # texts the editor's visible lines must contain once scrolled to `scroll_to`
    scroll_to: str  # the editor line brought to the top


# The chain settings the later runs of the chain get (resources.chain_settings) and the memory
# budget (resources.memory_guard) sit under `resources:`, after the ops.
LAUNCHPAD = Launchpad(
    "launchpad_full_training",
    "/locations/memopt_pipeline/jobs/full_training/playground",
    ("chain_settings", "cv_folds", "instance_model", "max_rounds", "shap_summary", "memory_guard", "budget_gb"),
    "resources:",
)
# Tall enough that the editor shows the whole resources section at once.
_LAUNCHPAD_VIEWPORT = (1400, 1500)
# budget_gb pre-filled with a number (Dagster shows nothing for a resource field built as None).
_BUDGET_LINE = re.compile(r"^\s*budget_gb: [0-9]+(\.[0-9]+)?\s*$", re.MULTILINE)


@dataclass(frozen=True)
class PlotShot:
    page: str
    label: str
    path: Path
    images: tuple[tuple[int, int], ...]  # natural (width, height) of each <img> in the dialog


@dataclass(frozen=True)
class LaunchpadShot:
    path: Path
    config: dict  # the editor's pre-filled run config, parsed
    visible: str  # the editor lines on screen when the screenshot was taken


@dataclass
class Report:
    pages: list[Path] = field(default_factory=list)
    plots: list[PlotShot] = field(default_factory=list)
    launchpad: LaunchpadShot | None = None
    unsettled: list[str] = field(default_factory=list)  # screenshots taken while the page still changed

    @property
    def screenshots(self) -> list[Path]:
        return [*self.pages, *(p.path for p in self.plots), *([self.launchpad.path] if self.launchpad else [])]


class BrowserCheckError(AssertionError):
    """A page did not render what it must; the message names the page and what is missing."""


def find_chromium() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


# How the UI shows a long markdown entry: a link that opens the markdown in a dialog.
_SHOW_MARKDOWN = "[Show Markdown]"
# In-page helpers: the "[Show Markdown]" link in the metadata row labelled `label`, the open
# dialog titled `label` (Blueprint dialogs; the title is the entry's label), whether finite CSS
# animations or transitions run inside `root` (a spinner's infinite one does not count), and a
# cheap signature of the page's DOM (it changes while the UI renders).
_JS_HELPERS = """
const showMarkdown = (label) => [...document.querySelectorAll('a, button, [role=button]')].filter((el) => {
  if (el.textContent.trim() !== %(show)s) return false;
  const row = el.closest('tr');
  return row !== null && row.cells.length > 1 && row.cells[0].textContent.trim() === label;
});
const dialogFor = (label) => [...document.querySelectorAll('[role=dialog], .bp5-dialog, .bp4-dialog')].find(
  (el) => [...el.querySelectorAll('h1, h2, h3, h4, h5, h6, [class*=header i], [class*=title i]')].some(
    (h) => h.textContent.trim() === label));
const animating = (root) => document.getAnimations().some((a) => a.playState === 'running' && a.effect
  && a.effect.getTiming().iterations !== Infinity && a.effect.target && root.contains(a.effect.target));
const domSignature = () => {
  const html = document.body ? document.body.innerHTML : '';
  let hash = 0;
  for (let i = 0; i < html.length; i += 7) hash = (hash * 31 + html.charCodeAt(i)) | 0;
  return html.length + ':' + hash + ':' + animating(document.documentElement);
};
const pageText = () => (document.body ? document.body.textContent : '');
const editor = () => { const el = document.querySelector('.CodeMirror'); return el && el.CodeMirror; };
const visibleEditorLines = () => {
  const box = document.querySelector('.CodeMirror-scroll').getBoundingClientRect();
  return [...document.querySelectorAll('.CodeMirror-line')].filter((line) => {
    const r = line.getBoundingClientRect();
    return r.height > 0 && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
  }).map((line) => line.textContent).join('\\n');
};
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
        self.url = None
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
            self.viewport(*_VIEWPORT)
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

    def navigate(self, url: str) -> None:
        """Load ``url`` afresh (a new document: nothing of the previous page's DOM is left)."""
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserCheckError(f"chromium could not load {url}: {result['errorText']}")
        self.url = url

    def viewport(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

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
        """First truthy value of ``expression``, polled; its last (falsy) value after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.2)  # the poll interval, not a wait for the page

    def settle(self, timeout: float = _SETTLE_TIMEOUT_SECONDS) -> bool:
        """Whether the page stopped changing (the same DOM, and no transition running, for
        _SETTLED_FOR_SECONDS) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while time.monotonic() < deadline:
            signature = self.evaluate("domSignature()")
            if signature != last or signature.endswith(":true"):
                last, since = signature, time.monotonic()
            elif time.monotonic() - since >= _SETTLED_FOR_SECONDS:
                return True
            time.sleep(0.2)
        return False

    def screenshot(self, png: Path, clip: dict | None = None) -> Path:
        """PNG of the viewport, or of ``clip`` (page coordinates, CSS px) within it."""
        params = {"format": "png"}
        if clip is not None:
            params.update(clip={**clip, "scale": 1})
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", **params)["data"]))
        if png.read_bytes()[:8] != PNG_SIGNATURE:
            raise BrowserCheckError(f"{png} is not a PNG")
        return png

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press_escape(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)

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


def check_page(browser: _DevTools, base_url: str, page: Page, out_dir: Path, report: Report) -> Path:
    """Screenshot of ``page`` (PNG under ``out_dir``) once its DOM shows what it must and it settled;
    the DOM is saved beside it as <name>.html."""
    url = base_url.rstrip("/") + page.path
    browser.navigate(url)
    texts = json.dumps(page.must_show)
    shown = browser.wait_for(f"{texts}.every((t) => pageText().includes(t))", _LOAD_TIMEOUT_SECONDS)
    html = out_dir / f"{page.name}.html"
    html.write_text(browser.evaluate("document.documentElement.outerHTML") or "")
    if not shown:
        text = browser.evaluate("pageText()") or ""
        missing = [t for t in page.must_show if t not in text]
        raise BrowserCheckError(
            f"{page.name}: {url} rendered without {missing} within {_LOAD_TIMEOUT_SECONDS} s (DOM saved as {html}); "
            "is a full run materialized, and is the webserver up?"
        )
    if not browser.settle():
        report.unsettled.append(page.name)
    return browser.screenshot(out_dir / f"{page.name}.png")


def _screenshot_dialog(browser: _DevTools, label_text: str, png: Path, what: str) -> Path:
    """Screenshot of the open dialog titled ``label_text``, whole: a dialog taller than the window
    (several plots) is captured in a window made tall enough to hold it, then the window is restored.
    Only what is on screen is captured (capturing beyond the viewport lays the page out again, which
    moves a centred dialog)."""
    label = json.dumps(label_text)
    measure = f"""(() => {{
        const r = dialogFor({label}).getBoundingClientRect();
        return {{x: r.x + window.scrollX, y: r.y + window.scrollY, width: r.width, height: r.height,
                 fits: r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0 && r.right <= window.innerWidth}};
    }})()"""
    box = browser.evaluate(measure)
    if box["fits"]:
        return browser.screenshot(png, clip={k: box[k] for k in ("x", "y", "width", "height")})
    browser.viewport(_VIEWPORT[0], int(box["height"]) + 2 * _DIALOG_MARGIN_PX)
    try:
        fits = browser.wait_for(
            f"(() => {{ const d = dialogFor({label}); const r = d.getBoundingClientRect(); return r.top >= 0 && r.bottom <= window.innerHeight"
            f" && !animating(d.closest('.bp5-portal, .bp4-portal, [role=dialog]') || d); }})()",
            _PLOT_TIMEOUT_SECONDS,
        )
        if not fits:
            raise BrowserCheckError(f"{what}: its dialog ({box['width']:.0f} x {box['height']:.0f} px) does not fit a window made tall enough for it")
        box = browser.evaluate(measure)
        return browser.screenshot(png, clip={k: box[k] for k in ("x", "y", "width", "height")})
    finally:
        browser.viewport(*_VIEWPORT)


def _check_plot(browser: _DevTools, page: PlotPage, label_text: str, out_dir: Path) -> PlotShot:
    """Open the entry's dialog, check its images, screenshot the dialog, close it."""
    label = json.dumps(label_text)
    what = f"{page.name}: the {label_text!r} entry on {browser.url}"
    rect = browser.evaluate(f"""(() => {{
        const links = showMarkdown({label});
        if (links.length !== 1) return links.length;
        links[0].scrollIntoView({{block: 'center'}});
        const r = links[0].getBoundingClientRect();
        return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
    }})()""")
    if not isinstance(rect, dict):
        raise BrowserCheckError(f"{what}: found {rect} {_SHOW_MARKDOWN} links in metadata rows labelled {label_text!r}, expected one")
    browser.click(rect["x"], rect["y"])  # a real click: the link must be on top and live
    # Open once the dialog holds its images, each loaded (complete), and its opening transition ended.
    opened = browser.wait_for(f"""(() => {{
        const dialog = dialogFor({label});
        if (!dialog) return null;
        const images = [...dialog.querySelectorAll('img')];
        if (!images.length || !images.every((img) => img.complete)) return null;
        return !animating(dialog.closest('.bp5-portal, .bp4-portal, [role=dialog]') || dialog);
    }})()""", _PLOT_TIMEOUT_SECONDS)
    if not opened:
        state = browser.evaluate(f"""(() => {{ const d = dialogFor({label});
            if (!d) return 'no dialog opened';
            const images = [...d.querySelectorAll('img')];
            return images.length ? `its ${{images.length}} <img> did not finish loading, or it kept moving` : 'its dialog holds no <img>'; }})()""")
        raise BrowserCheckError(f"{what}: clicked {_SHOW_MARKDOWN}, but {state} within {_PLOT_TIMEOUT_SECONDS} s")
    # decode() settles once a PNG is decoded, and rejects if it cannot be.
    images = browser.evaluate(f"""Promise.all([...dialogFor({label}).querySelectorAll('img')].map((img) => img.decode().then(
        () => ({{ok: img.naturalWidth > 0, src: img.getAttribute('src').slice(0, 40), width: img.naturalWidth,
                 height: img.naturalHeight, shown: img.getBoundingClientRect().width}}),
        (error) => ({{ok: false, error: String(error), src: img.getAttribute('src').slice(0, 40), width: img.naturalWidth}}))))""")
    for number, image in enumerate(images, 1):
        which = f"{what}: the dialog's image {number} of {len(images)}"
        if not image["src"].startswith("data:image/png;base64,"):
            raise BrowserCheckError(f"{which} is not an inline PNG (src starts {image['src']!r})")
        if not image["ok"] or not image.get("shown"):
            raise BrowserCheckError(f"{which} did not decode or is not shown: {image}")
        if image["width"] < MIN_PLOT_WIDTH_PX:
            raise BrowserCheckError(f"{which} is {image['width']} px wide, under {MIN_PLOT_WIDTH_PX} px: {image}")
    png = _screenshot_dialog(browser, label_text, out_dir / f"{page.name}_{label_text}.png", what)
    # Close the dialog (Escape) so that the next entry's link is not covered; closed once it left the DOM.
    browser.press_escape()
    if not browser.wait_for(f"!dialogFor({label})", 10):
        raise BrowserCheckError(f"{what}: its dialog did not close on Escape")
    return PlotShot(page.name, label_text, png, tuple((i["width"], i["height"]) for i in images))


def check_plots(browser: _DevTools, base_url: str, page: PlotPage, out_dir: Path) -> list[PlotShot]:
    """Screenshots of the dialogs of ``page``'s plot entries (PNGs under ``out_dir``)."""
    url = base_url.rstrip("/") + page.path
    if browser.url != url:
        browser.navigate(url)
    # Rendered once every entry of this page has its link (the metadata loads last).
    labels = json.dumps(page.labels)
    if not browser.wait_for(f"{labels}.every((l) => showMarkdown(l).length > 0)", _LOAD_TIMEOUT_SECONDS):
        found = browser.evaluate(
            f"[...document.querySelectorAll('tr')].filter((r) => r.textContent.includes({json.dumps(_SHOW_MARKDOWN)}))"
            ".map((r) => r.cells[0] && r.cells[0].textContent.trim())"
        )
        raise BrowserCheckError(
            f"{page.name}: {url} showed no {_SHOW_MARKDOWN} link for {labels} within "
            f"{_LOAD_TIMEOUT_SECONDS} s (entries with one: {found}); is a full run materialized?"
        )
    return [_check_plot(browser, page, label, out_dir) for label in page.labels]


def check_launchpad(browser: _DevTools, base_url: str, launchpad: Launchpad, out_dir: Path, report: Report) -> LaunchpadShot:
    """The job's Launchpad: its editor pre-filled with the run config, the lines from
    ``launchpad.scroll_to`` on screen showing ``launchpad.must_show`` and a numeric budget_gb, the
    config valid ("No errors"); a screenshot of it."""
    url = base_url.rstrip("/") + launchpad.path
    what = f"{launchpad.name}: {url}"
    browser.viewport(*_LAUNCHPAD_VIEWPORT)
    try:
        browser.navigate(url)
        scroll_to = json.dumps(launchpad.scroll_to)
        # The editor is filled once the job's config schema loaded (GraphQL) and its defaults were scaffolded.
        text = browser.wait_for(
            f"(() => {{ const cm = editor(); const v = cm && cm.getValue(); return v && v.split('\\n').includes({scroll_to}) ? v : null; }})()",
            _LOAD_TIMEOUT_SECONDS,
        )
        if not text:
            shown = (browser.evaluate("pageText()") or "")[:500]
            raise BrowserCheckError(f"{what}: no config editor holding a {launchpad.scroll_to!r} line within {_LOAD_TIMEOUT_SECONDS} s (page: {shown!r})")
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise BrowserCheckError(f"{what}: the Launchpad's config is not YAML ({error}):\n{text}") from None
        browser.evaluate(f"""(() => {{
            const cm = editor();
            cm.scrollTo(null, cm.heightAtLine(cm.getValue().split('\\n').indexOf({scroll_to}), 'local'));
            return true;
        }})()""")
        must_show = json.dumps(launchpad.must_show)
        visible = browser.wait_for(
            f"(() => {{ const v = visibleEditorLines(); return {must_show}.every((t) => v.includes(t))"
            f" && new RegExp({json.dumps(_BUDGET_LINE.pattern)}, 'm').test(v) ? v : null; }})()",
            _LOAD_TIMEOUT_SECONDS,
        )
        if not visible:
            shown = browser.evaluate("visibleEditorLines()")
            raise BrowserCheckError(
                f"{what}: the editor, scrolled to {launchpad.scroll_to!r}, does not show all of {list(launchpad.must_show)} "
                f"and a numeric budget_gb; it shows:\n{shown}"
            )
        # The UI validates the config against the job's schema and lists problems under ERRORS.
        if not browser.wait_for("pageText().includes('No errors')", _LOAD_TIMEOUT_SECONDS):
            raise BrowserCheckError(f"{what}: the pre-filled config does not validate: {(browser.evaluate('pageText()') or '')[-1500:]}")
        if not browser.settle():
            report.unsettled.append(launchpad.name)
        png = browser.screenshot(out_dir / f"{launchpad.name}.png")
    finally:
        browser.viewport(*_VIEWPORT)
        browser.url = None  # the layout changed under the page: load it afresh if it comes again
    return LaunchpadShot(png, config, visible)


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


def check_pages(
    base_url: str,
    out_dir: str | Path,
    chromium: str | None = None,
    pages: tuple[Page, ...] = PAGES,
    plots: tuple[PlotPage, ...] = PLOT_PAGES,
    launchpad: Launchpad | None = LAUNCHPAD,
) -> Report:
    """Every check, in one browser: the pages, the plot dialogs, the Launchpad. Raises
    BrowserCheckError at the first that fails; the report lists the screenshots (PNGs under
    ``out_dir``) and what the checks read."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise BrowserCheckError(f"no Chromium found (looked for {', '.join(_CANDIDATES)}); install it: apt-get install -y chromium")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dismiss_welcome_dialog(base_url)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="memopt-chromium-") as profile:
        browser = _DevTools(chromium, profile)
        try:
            for page in pages:
                report.pages.append(check_page(browser, base_url, page, out, report))
            for page in plots:
                report.plots.extend(check_plots(browser, base_url, page, out))
            if launchpad is not None:
                report.launchpad = check_launchpad(browser, base_url, launchpad, out, report)
        finally:
            browser.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000", help="webserver address")
    parser.add_argument("--out", default=os.path.join("data", "output", "ui_screenshots"), help="folder for PNGs and DOM dumps")
    parser.add_argument(
        "--partitions", default=",".join(INSTANCE_PARTITIONS), help="instance_model partitions whose plots to open (comma-separated)"
    )
    args = parser.parse_args(argv)
    try:
        report = check_pages(args.url, args.out, plots=plot_pages(tuple(p for p in args.partitions.split(",") if p)))
    except BrowserCheckError as error:
        print(f"browser check failed: {error}", file=sys.stderr)
        return 1
    for png in report.pages:
        print(f"rendered: {png}")
    for plot in report.plots:
        print(f"plot: {plot.path} ({', '.join(f'{w} x {h} px' for w, h in plot.images)})")
    if report.launchpad is not None:
        print(f"launchpad: {report.launchpad.path}")
    if report.unsettled:
        print(f"still changing when captured: {', '.join(report.unsettled)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
