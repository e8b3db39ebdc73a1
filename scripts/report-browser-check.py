"""Opens a distill report.html in headless Chromium (Playwright driving Debian's chromium) and
checks that it renders: no console errors, no page errors, no request leaving the file (the page
must be self-contained), every plot present with a non-empty drawing. Saves a full-page
screenshot. Prints PASS/FAIL per check; exits 1 if any failed.

Usage: python report-browser-check.py REPORT_HTML SCREENSHOT_PNG [MIN_PLOTS]
"""

import pathlib
import sys

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
# As the machine's notes advise for a closed network: no background connections.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def main() -> int:
    page_path = pathlib.Path(sys.argv[1]).resolve()
    shot = pathlib.Path(sys.argv[2]).resolve()
    min_plots = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    failures = []

    def check(ok: bool, what: str) -> None:
        print(("PASS " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        console_errors, page_errors, outside = [], [], []
        page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: page_errors.append(str(e)))

        def route(r):
            if r.request.url.startswith("file://"):
                r.continue_()
            else:
                outside.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.goto(page_path.as_uri(), wait_until="load")
        check(not console_errors, f"no console errors {console_errors}")
        check(not page_errors, f"no page errors {page_errors}")
        check(not outside, f"no request leaves the file {outside}")
        title = page.title()
        check(title.startswith("distill"), f"title {title!r}")

        plots = page.evaluate(
            """() => [...document.querySelectorAll('figure')].map(f => {
                const svg = f.querySelector('svg');
                const cap = f.querySelector('figcaption')?.textContent ?? '';
                if (!svg) return {cap, svg: false};
                const box = svg.getBoundingClientRect();
                return {
                    cap, svg: true, width: box.width, height: box.height,
                    points: svg.querySelectorAll('circle').length,
                    bars: [...svg.querySelectorAll('rect')].filter(r => !['#FFFFFF', 'none'].includes((r.getAttribute('fill') || 'none').toUpperCase().replace('NONE', 'none'))).length,
                    texts: [...svg.querySelectorAll('text')].filter(t => t.getBBox().width > 0).length,
                };
            })"""
        )
        drawn = [x for x in plots if x["svg"]]
        check(len(drawn) >= min_plots, f"{len(drawn)} plots drawn (at least {min_plots})")
        for x in plots:
            if not x["svg"]:
                print(f"note: '{x['cap']}' has no plot (the page says why)")
                continue
            ok = x["width"] > 100 and x["height"] > 100 and (x["points"] > 0 or x["bars"] > 0) and x["texts"] > 3
            check(ok, f"plot '{x['cap']}': {x['width']:.0f}x{x['height']:.0f} px, "
                      f"{x['points']} points, {x['bars']} bars, {x['texts']} visible labels")
        tables = page.evaluate("() => document.querySelectorAll('table tr').length")
        check(tables >= 5, f"{tables} table rows")
        page.screenshot(path=str(shot), full_page=True)
        check(shot.stat().st_size > 10_000, f"screenshot {shot} ({shot.stat().st_size} bytes)")
        browser.close()
    print("ALL PASS" if not failures else f"{len(failures)} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
