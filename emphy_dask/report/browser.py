"""Open report pages in a real headless Chromium and check them (used by the tests).

Every page must load with no console error and every ``<img>`` must have decoded
(``naturalWidth > 0``); a screenshot of each page is saved. Needs Debian's ``chromium`` and
``chromium-driver`` and the ``selenium`` package; ``find_chromium`` says what is missing.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1280,1600", "--allow-file-access-from-files")


def find_chromium() -> tuple[str | None, str | None, str]:
    """(browser, driver, reason): the binaries, or None with why not."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [n for n, p in (("chromium", browser), ("chromedriver (chromium-driver)", driver)) if not p]
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        missing.append("selenium (pip)")
    return browser, driver, ("missing: " + ", ".join(missing)) if missing else ""


class PageChecker:
    """One headless Chromium session with a fresh profile; ``check(path)`` per page."""

    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver, why = find_chromium()
        if why:
            raise RuntimeError(why)
        self.profile = tempfile.mkdtemp(prefix="emphy-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = browser
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={self.profile}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=driver), options=opts)

    def check(self, page: Path, screenshot: Path | None = None) -> dict:
        """Load ``page`` (file://); returns {title, images, broken, errors, screenshot}."""
        d = self.driver
        d.get(Path(page).resolve().as_uri())
        d.execute_script("return document.readyState")
        images = d.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        broken = [src for src, complete, width in images if not complete or not width]
        errors = [e["message"] for e in d.get_log("browser") if e.get("level") in ("SEVERE", "ERROR")]
        if screenshot:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            d.save_screenshot(str(screenshot))
        return {"title": d.title, "images": len(images), "broken": broken, "errors": errors,
                "screenshot": str(screenshot) if screenshot else None,
                "links": d.execute_script("return Array.from(document.links).map(a => a.href);")}

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
