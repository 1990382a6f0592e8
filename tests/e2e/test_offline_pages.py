"""Every page a real `bentoml serve` serves works offline: nothing it loads leaves the machine.

Statically: the pages (the docs page at /, the playground) and the stylesheets they link name no
other host, and each sends a Content-Security-Policy that lets nothing load from elsewhere. In a
real headless Chromium (skipped without one, as the playground test): each page renders, and every
resource it fetched came from the server itself, with no CSP violation in the console."""

from __future__ import annotations

import os
import re
import shutil
import time
from urllib.parse import urljoin, urlparse

import pytest
import requests

pytestmark = pytest.mark.e2e

PAGES = ["/", "/playground"]
# XML namespaces (inline SVG) are names, not addresses: nothing is fetched from them.
NAMESPACES = ("http://www.w3.org/",)
ABSOLUTE = re.compile(r"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'<>)]*")
LINKED = re.compile(r"""<(?:script|link|img|iframe|source|embed|object)\b[^>]*?(?:src|href)\s*=\s*["']([^"']+)""",
                    re.IGNORECASE)
CSS_URL = re.compile(r"""url\(\s*["']?([^"')]+)|@import\s+["']([^"']+)""", re.IGNORECASE)


@pytest.fixture(scope="module")
def srv(server):
    return server


def external(text: str) -> list[str]:
    return [u for u in ABSOLUTE.findall(text) if not u.startswith(NAMESPACES)]


@pytest.mark.parametrize("path", PAGES)
def test_pages_name_no_other_host(srv, path):
    r = requests.get(srv.url + path, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert external(r.text) == [], f"{path} names other hosts"
    assert "googletagmanager" not in r.text
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "http" not in csp
    for ref in LINKED.findall(r.text):
        if ref.startswith("data:"):
            continue  # inline content, nothing fetched
        url = urljoin(srv.url + path, ref)
        assert urlparse(url).netloc == urlparse(srv.url).netloc, ref
        asset = requests.get(url, timeout=30)
        assert asset.status_code == 200, ref
        if url.endswith(".css"):
            refs = [a or b for a, b in CSS_URL.findall(asset.text)]
            assert [u for u in refs if not u.startswith("data:") and urlparse(u).netloc] == [], ref


CHROMIUM = os.environ.get("KVBENTO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KVBENTO_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        reason = f"no {', '.join(missing)}: `make browser` installs chromium and chromium-driver"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true needs a browser: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download a driver) never runs.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


# What shows that a page rendered: Swagger UI's operations, the model name the playground read.
RENDERED = {"/": "document.querySelectorAll('.opblock').length > 10",
            "/playground": "document.getElementById('model').textContent.includes('kvbento-tiny')"}


@pytest.mark.parametrize("path", PAGES)
def test_pages_load_only_from_the_server(srv, browser, path):
    browser.get(srv.url + path)
    deadline = time.monotonic() + 60
    while not browser.execute_script("return " + RENDERED[path]):
        assert time.monotonic() < deadline, f"{path} did not render"
        time.sleep(0.1)
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    origin = f"{urlparse(srv.url).scheme}://{urlparse(srv.url).netloc}"
    assert fetched and all(u.startswith(origin) for u in fetched), fetched
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
