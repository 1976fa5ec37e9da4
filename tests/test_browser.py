"""`featurestore serve` in a real browser: the system's headless Chromium, driven through its
ChromeDriver by selenium, against the app served by uvicorn on a free local port.

Screenshots of every step are saved under artifacts/browser/ (or $FEATURESTORE_TEST_ARTIFACTS).
`make test` installs chromium and chromium-driver (Debian packages) and sets
FEATURESTORE_BROWSER_TESTS=required, so there a missing browser fails these tests; elsewhere they
are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import snapshot

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("FEATURESTORE_TEST_ARTIFACTS",
                                Path(__file__).parent.parent / "artifacts" / "browser"))
WAIT_S = 30  # charts render in well under a second; a loaded CI machine gets room


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        reason = (f"{', '.join(missing)} not installed (Debian packages chromium and "
                  "chromium-driver; `make test` installs them)")
        if os.environ.get("FEATURESTORE_BROWSER_TESTS") == "required":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root in a container, and nothing that reaches for the network at start-up.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,1600"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def warehouse(analysed_warehouse, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser") / "warehouse"
    shutil.copytree(analysed_warehouse, root)
    return root


@pytest.fixture(scope="module")
def server(warehouse) -> str:
    """`featurestore serve` itself, in a process of its own, on a free port of 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "featurestore", "--warehouse", str(warehouse), "serve",
         "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 2 * WAIT_S
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=5) as response:
                assert response.status == 200
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"featurestore serve did not start: {process.stdout.read()}")
            time.sleep(0.2)
    yield url
    process.terminate()
    output, _ = process.communicate(timeout=WAIT_S)
    assert "Traceback" not in output, output


def wait_for(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(
        ready.presence_of_element_located((By.CSS_SELECTOR, css)))


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_from_a_birth_to_its_feature_page_and_to_sql(browser, server, warehouse):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from .conftest import query

    # The basis page: keep the born features, then follow the earliest birth.
    browser.get(f"{server}/bases/tiny-l2")
    wait_for(browser, "#chart-birth-timeline[data-rendered='true'] svg")
    shot(browser, "1-basis")
    Select(browser.find_element(By.NAME, "born")).select_by_value("born")
    browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
    first = wait_for(browser, "#feature-table tbody tr td a")
    feature = int(first.text)
    (birth,) = query(warehouse, "SELECT min(birth_step) FROM births WHERE basis = 'tiny-l2'")[0]
    cells = browser.find_elements(By.CSS_SELECTOR, "#feature-table tbody tr:first-child td")
    assert int(cells[1].text) == birth, "sorted by birth step, the first row is the earliest"
    first.click()

    # The feature page: the trajectory chart drew its lines, the contexts mark their token.
    wait_for(browser, "#chart-trajectory[data-rendered='true']")
    assert browser.current_url.endswith(f"/bases/tiny-l2/features/{feature}")
    lines = browser.find_elements(By.CSS_SELECTOR, "#chart-trajectory svg .mark-line path")
    assert len(lines) == 3, "rate, energy and drift each drew a line"
    assert all(len(line.get_attribute("d") or "") > 10 for line in lines)
    assert f"Born at step {birth}" in browser.find_element(By.ID, "birth-line").text
    marked = browser.find_elements(By.CSS_SELECTOR, "#feature_examples mark.active")
    assert marked and all(m.text.strip() for m in marked)
    assert marked[0].value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    shot(browser, "2-feature")

    # Another checkpoint: the contexts are those of that step.
    step = Select(browser.find_element(By.ID, "step"))
    current = step.first_selected_option.get_attribute("value")
    other = next(o.get_attribute("value") for o in step.options
                 if o.get_attribute("value") != current)
    step.select_by_value(other)
    browser.find_element(By.ID, "apply").click()
    heading = wait_for(browser, "#feature_examples h2")
    assert heading.text == f"Top activating contexts at step {other}"
    assert f"step={other}" in browser.current_url
    shot(browser, "3-feature-other-step")

    # The SQL page: type a query, run it, read the table.
    browser.get(f"{server}/sql")
    box = wait_for(browser, "#query")
    box.send_keys("SELECT feature_id, step, activation_rate FROM trajectories "
                  f"WHERE basis = 'tiny-l2' AND feature_id = {feature} ORDER BY step")
    browser.find_element(By.ID, "run").click()
    wait_for(browser, "#result")
    rows = browser.find_elements(By.CSS_SELECTOR, "#result tbody tr")
    steps = query(warehouse, "SELECT step FROM trajectories WHERE basis = 'tiny-l2' AND "
                             "feature_id = ? ORDER BY step", [feature])
    assert [int(r.find_elements(By.TAG_NAME, "td")[1].text) for r in rows] == [
        s for (s,) in steps]
    shot(browser, "4-sql")


def test_a_write_through_the_sql_page_fails_and_changes_nothing(browser, server, warehouse):
    from selenium.webdriver.common.by import By

    before = snapshot(warehouse)
    data = warehouse / "data"
    for attempt in (f"COPY (SELECT * FROM runs) TO '{data}/main/runs/extra.parquet'",
                    "DELETE FROM checkpoints",
                    f"ATTACH '{warehouse}/catalog.sqlite' AS c (TYPE sqlite)"):
        browser.get(f"{server}/sql")
        box = wait_for(browser, "#query")
        box.send_keys(attempt)
        browser.find_element(By.ID, "run").click()
        error = wait_for(browser, "#sql-error")
        assert "read-only SQL" in error.text
        assert not browser.find_elements(By.ID, "result")
    shot(browser, "5-sql-refused")
    assert snapshot(warehouse) == before
    assert not (data / "main" / "runs" / "extra.parquet").exists()
