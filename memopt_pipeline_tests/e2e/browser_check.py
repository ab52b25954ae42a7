"""Browser check of the Dagster UI: the asset graph and an asset page render in headless Chromium.

Against a running webserver with at least one full run materialized:

    python -m memopt_pipeline_tests.e2e.browser_check --url http://127.0.0.1:3000 --out data/output/ui

For each page it takes a PNG screenshot and dumps the DOM after the page's JavaScript ran, and
fails unless the DOM shows the names it must show (an empty shell or an error page does not).
The e2e test test_servers.py runs it against its own servers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# CI sets this so that a missing browser fails the check instead of skipping it.
REQUIRE_BROWSER_ENV = "MEMOPT_REQUIRE_BROWSER"
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# The UI is a JavaScript app that loads its data through GraphQL after the first paint; the
# virtual time budget lets Chromium run timers and requests that long before it captures.
_VIRTUAL_TIME_MS = 20_000
_TIMEOUT_SECONDS = 120


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


class BrowserCheckError(AssertionError):
    """A page did not render what it must; the message names the page and what is missing."""


def find_chromium() -> str | None:
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(chromium: str, url: str, *action: str) -> subprocess.CompletedProcess:
    # A fresh profile each time: no cached UI state, no first-run dialogs; nothing phones home.
    with tempfile.TemporaryDirectory(prefix="memopt-chromium-") as profile:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={_VIRTUAL_TIME_MS}",
            *action, url,
        ]  # fmt: skip
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
    return [check_page(chromium, base_url, page, out) for page in PAGES]


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
