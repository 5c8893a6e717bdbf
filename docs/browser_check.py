"""Check a built Sphinx HTML site in headless Chromium (offline).

Usage::

    python docs/browser_check.py BUILD_DIR [--screenshots DIR] [--chromium PATH] [--jobs N]

BUILD_DIR is a Sphinx ``html`` build (for example ``docs/_build/html``).  The
script serves it on ``127.0.0.1`` (a free port), opens every ``.html`` file of
the build in headless Chromium driven by Playwright, and checks on each page:

* no console errors, no uncaught page errors, no failed requests, no HTTP
  responses >= 400, and no request to any other host than the local server
  (such requests are blocked and reported: the site must work offline);
* math is rendered: every element with class ``math`` holds a MathJax 3
  ``mjx-container`` of non-zero size without ``mjx-merror``/``data-mjx-error``
  (KaTeX output or native MathML are accepted as well);
* every ``<img>`` has loaded (``complete`` and ``naturalWidth > 0``);
* every same-site link points to a file of the build, and its ``#fragment``
  (if any) to an ``id`` (or ``<a name>``) on the target page.

External links (http(s) to other hosts) are not followed, only counted;
``mailto:``/``javascript:``/``tel:``/``data:`` links are ignored.  Full-page
screenshots of ``index.html`` and ``performance.html`` (where present) go to
``--screenshots`` (default: ``BUILD_DIR/../screenshots``).

Prints ``ok  PATH`` or ``FAIL PATH: reasons`` per page and a summary; exits 1
on any failure, 0 otherwise, 2 when Chromium, Playwright or the build is
missing.  ``--jobs N`` tabs load at once (default 3).  Chromium: ``--chromium
PATH``, else ``$PBN_CHROMIUM``, else ``/usr/bin/chromium`` (``apt-get install
chromium``).  Playwright for Python (``pip install playwright``) drives the
system Chromium; ``playwright install`` (a browser download) is never needed.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from playwright.sync_api import BrowserContext, ConsoleMessage, Request, Response, Route

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT_PAGES = ("index.html", "performance.html")
NAV_TIMEOUT_MS = 20_000
SETTLE_TIMEOUT_MS = 15_000
IGNORED_SCHEMES = {"mailto", "javascript", "tel", "data", "blob", "about"}

# Runs in the page once it has loaded: waits for MathJax's first typesetting,
# the fonts and every image, then reports math, images, ids and links.
SETTLE_AND_COLLECT_JS = r"""
async (timeoutMs) => {
  const withTimeout = (promise, label) => Promise.race([
    Promise.resolve(promise).then(() => null, (err) => label + ' rejected: ' + err),
    new Promise((resolve) => setTimeout(() => resolve(label + ' timed out'), timeoutMs)),
  ]);
  const notes = [];
  const mathEls = Array.from(document.querySelectorAll('.math'));
  if (mathEls.length) {
    // Scripts (async and defer too) have run by the load event: a short grace period is enough.
    const start = Date.now();
    while (!(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise)
           && !document.querySelector('.math .katex, .math math') && Date.now() - start < 2000) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
      const note = await withTimeout(window.MathJax.startup.promise, 'MathJax.startup.promise');
      if (note) notes.push(note);
    }
  }
  for (const img of document.images) {
    if (img.loading === 'lazy') img.loading = 'eager';
  }
  const pending = Array.from(document.images).filter((img) => !img.complete).map((img) => new Promise((resolve) => {
    img.addEventListener('load', resolve);
    img.addEventListener('error', resolve);
  }));
  const imgNote = await withTimeout(Promise.all(pending), 'image loading');
  if (imgNote) notes.push(imgNote);
  if (document.fonts && document.fonts.ready) {
    const fontNote = await withTimeout(document.fonts.ready, 'document.fonts.ready');
    if (fontNote) notes.push(fontNote);
  }
  // MathJax's "noundefined" extension shows an unknown \macro as red text instead of an error.
  const undefinedMacros = new Map();
  const texSource = new Map();
  try {
    const startup = window.MathJax && MathJax.startup;
    const doc = startup && typeof startup.toMML === 'function' && startup.document;
    for (const item of (doc && doc.math) || []) {
      if (item.typesetRoot) texSource.set(item.typesetRoot, item.math);
      const mml = startup.toMML(item.root);
      const found = mml.match(/<mtext mathcolor="red">\\[A-Za-z]+<\/mtext>/g);
      if (found && item.typesetRoot) {
        undefinedMacros.set(item.typesetRoot, found.map((m) => m.replace(/<[^>]*>/g, '')).join(' '));
      }
    }
  } catch (err) {
    notes.push('could not inspect MathJax output: ' + err);
  }
  const hasSize = (el) => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const math = mathEls.map((el) => {
    const mjx = el.querySelector('mjx-container');
    const source = ((mjx && texSource.get(mjx)) || el.textContent || '').replace(/\s+/g, ' ').trim().slice(0, 60);
    if (mjx) {
      if (mjx.querySelector('mjx-merror, [data-mjx-error]')) {
        const err = mjx.querySelector('[data-mjx-error]');
        return 'MathJax error' + (err ? ' "' + err.getAttribute('data-mjx-error') + '"' : '') + ' in ' + source;
      }
      const undef = undefinedMacros.get(mjx);
      if (undef) return 'undefined TeX macro ' + undef + ' in ' + source;
      return hasSize(mjx) ? null : 'empty mjx-container for ' + source;
    }
    const other = el.querySelector('.katex, math');
    if (other) return hasSize(other) ? null : 'empty rendering for ' + source;
    return 'not rendered: ' + source;
  }).filter((m) => m !== null);
  const images = Array.from(document.images)
    .filter((img) => !(img.complete && img.naturalWidth > 0))
    .map((img) => img.currentSrc || img.src || img.outerHTML.slice(0, 80));
  const ids = Array.from(document.querySelectorAll('[id]')).map((el) => el.id);
  const names = Array.from(document.querySelectorAll('a[name]')).map((el) => el.getAttribute('name'));
  const links = Array.from(document.querySelectorAll('a[href], area[href]')).map((a) => a.href);
  return {notes, mathCount: mathEls.length, math, images, ids: ids.concat(names), links};
}
"""


@dataclass
class PageResult:
    """What one page showed in the browser."""

    path: str
    errors: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    links: list[str] = field(default_factory=list)
    math_count: int = 0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a tab closed while a request was answered
            super().handle_error(request, client_address)


@contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` over http on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="browser-check-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def find_pages(root: Path) -> list[str]:
    """Every .html file under ``root``, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html") if p.is_file())


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class PageCheck:
    """One page in its own tab: ``start`` opens it (without waiting), ``finish`` waits and collects."""

    def __init__(self, context: BrowserContext, base: str, path: str) -> None:
        self.result = PageResult(path)
        self.origin = urlsplit(base).netloc
        self.external: list[str] = []
        self.page = context.new_page()
        # A regular expression is matched inside the browser; a Python callable would pause every request.
        schemes = "|".join(f"{s}:" for s in sorted(IGNORED_SCHEMES))
        self.page.route(re.compile(f"^(?!{re.escape(base)}|{schemes})"), self._block)
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.result.errors.append(f"page error: {_short(str(exc))}"))
        self.page.on("requestfailed", self._on_request_failed)
        self.page.on("response", self._on_response)
        self.url = base + path
        self.opened = False

    def _block(self, route: Route) -> None:
        self.external.append(route.request.url)
        route.abort("blockedbyclient")

    def _on_console(self, msg: ConsoleMessage) -> None:
        if msg.type == "error":
            loc = msg.location
            where = f" ({loc.get('url', '')}:{loc.get('lineNumber', '')})" if loc and loc.get("url") else ""
            self.result.errors.append(f"console error: {_short(msg.text)}{where}")

    def _on_request_failed(self, request: Request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme not in IGNORED_SCHEMES and parts.netloc == self.origin:  # others: reported as blocked
            self.result.errors.append(f"request failed: {request.url} ({request.failure})")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.result.errors.append(f"HTTP {response.status}: {response.url}")

    def start(self) -> None:
        from playwright.sync_api import Error as PlaywrightError

        try:
            self.page.goto(self.url, wait_until="commit", timeout=NAV_TIMEOUT_MS)
            self.opened = True
        except PlaywrightError as exc:
            self.result.errors.append(f"browser: {_short(str(exc))}")

    def finish(self, screenshot: Path | None) -> PageResult:
        from playwright.sync_api import Error as PlaywrightError

        result = self.result
        try:
            if not self.opened:
                return result
            self.page.wait_for_load_state("load", timeout=NAV_TIMEOUT_MS)
            data = self.page.evaluate(SETTLE_AND_COLLECT_JS, SETTLE_TIMEOUT_MS)
            if screenshot is not None:
                self.page.screenshot(path=str(screenshot), full_page=True)
            result.errors.extend(data["notes"])
            result.math_count = data["mathCount"]
            result.errors.extend(f"math {m}" for m in data["math"])
            result.errors.extend(f"image not loaded: {src}" for src in data["images"])
            result.ids = set(data["ids"])
            result.links = data["links"]
        except PlaywrightError as exc:  # a timeout or a crashed page: report it, go on
            result.errors.append(f"browser: {_short(str(exc))}")
        finally:
            self.page.close()
            result.errors.extend(
                f"request to another host (offline site required): {url}" for url in dict.fromkeys(self.external)
            )
        return result


def check_links(root: Path, base: str, results: dict[str, PageResult]) -> int:
    """Add broken internal links/anchors to each page's errors; return the number of external links."""
    origin = urlsplit(base).netloc
    externals: set[str] = set()
    for res in results.values():
        seen: set[str] = set()
        for url in res.links:
            parts = urlsplit(url)
            if parts.scheme in IGNORED_SCHEMES or not parts.scheme:
                continue
            if parts.netloc != origin:
                if parts.scheme in ("http", "https"):
                    externals.add(url)
                continue
            target = unquote(parts.path).lstrip("/")
            if not target or target.endswith("/"):
                target += "index.html"
            elif (root / target).is_dir():
                target += "/index.html"
            target = PurePosixPath(target).as_posix()
            shown = target + (f"#{parts.fragment}" if parts.fragment else "")
            if shown in seen:
                continue
            seen.add(shown)
            file = root / target
            if not file.is_file() or not file.resolve().is_relative_to(root):
                res.errors.append(f"broken link: {shown}")
                continue
            fragment = unquote(parts.fragment)
            if not fragment or fragment.lower() == "top" or target not in results:
                continue
            if fragment not in results[target].ids:
                res.errors.append(f"broken anchor: {shown}")
    return len(externals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build_dir", type=Path, help="Sphinx html build, e.g. docs/_build/html")
    parser.add_argument(
        "--screenshots", type=Path, metavar="DIR", help="folder for the PNGs (default: BUILD_DIR/../screenshots)"
    )
    parser.add_argument(
        "--chromium",
        metavar="PATH",
        default=os.environ.get("PBN_CHROMIUM") or DEFAULT_CHROMIUM,
        help=f"Chromium executable (default: $PBN_CHROMIUM or {DEFAULT_CHROMIUM})",
    )
    parser.add_argument("--jobs", type=int, default=3, metavar="N", help="pages loading at once (default: 3)")
    args = parser.parse_args(argv)
    args.jobs = max(1, args.jobs)

    root: Path = args.build_dir.resolve()
    pages = find_pages(root) if root.is_dir() else []
    if not pages:
        print(
            f"error: {args.build_dir} has no .html files (build first: python -m sphinx -b html docs DIR)",
            file=sys.stderr,
        )
        return 2
    chromium = shutil.which(args.chromium) or args.chromium
    if not (os.path.isfile(chromium) and os.access(chromium, os.X_OK)):
        print(
            f"error: Chromium not found at {args.chromium!r}: install it (Debian: apt-get install chromium) "
            "or pass --chromium PATH / set PBN_CHROMIUM",
            file=sys.stderr,
        )
        return 2
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        print(
            "error: Playwright for Python is missing: pip install playwright (no 'playwright install' needed)",
            file=sys.stderr,
        )
        return 2
    shots: Path = (args.screenshots or root.parent / "screenshots").resolve()
    shots.mkdir(parents=True, exist_ok=True)

    start = time.monotonic()
    results: dict[str, PageResult] = {}
    with serve(root) as base, sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="pbn-chromium-") as tmp:
        try:
            browser = pw.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                env={**os.environ, "HOME": tmp, "XDG_CONFIG_HOME": tmp, "XDG_CACHE_HOME": tmp},
            )
        except PlaywrightError as exc:
            print(f"error: could not start Chromium {chromium}: {_short(str(exc), 600)}", file=sys.stderr)
            return 2
        try:
            # One context (one cache) for all pages, a new tab per page so events stay with their page.
            context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
            # Up to --jobs tabs load at once; each keeps its own events.
            for i in range(0, len(pages), args.jobs):
                batch = [PageCheck(context, base, path) for path in pages[i : i + args.jobs]]
                for check in batch:
                    check.start()
                for check in batch:
                    path = check.result.path
                    shot = shots / (Path(path).stem + ".png") if path in SCREENSHOT_PAGES else None
                    results[path] = check.finish(shot)
        finally:
            browser.close()
        n_external = check_links(root, base, results)

    failed = 0
    for path, res in results.items():
        if res.errors:
            failed += 1
            print(f"FAIL {path}: " + "; ".join(dict.fromkeys(res.errors)))
        else:
            print(f"ok  {path}")
    n_math = sum(r.math_count for r in results.values())
    n_links = sum(len(r.links) for r in results.values())
    taken = [str(png) for p in SCREENSHOT_PAGES if p in results and (png := shots / (Path(p).stem + ".png")).is_file()]
    print(
        f"\n{len(results)} pages, {failed} failed; {n_math} math elements, {n_links} links "
        f"({n_external} distinct external, not followed); {time.monotonic() - start:.1f} s"
    )
    print("screenshots: " + (", ".join(taken) if taken else "none (no index.html / performance.html)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
