"""The dashboard in a real browser: Debian's chromium (headless) driven through its
chromium-driver by Selenium, against ``outbox dashboard`` on an SQLite file. It lists,
filters, opens a message, signs in and replays a dead row, and keeps a screenshot of
every page it saw in test-artifacts/dashboard/ (or $OUTBOX_TEST_ARTIFACTS/dashboard/).

Without chromium, its driver or Selenium the test skips on a laptop and fails when
``CI`` is set (scripts/services installs chromium and chromium-driver; see the
``chromium`` fixture)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import outbox
from integration.dashboard_support import Seeded, dashboard_process, seed
from outbox.schema import outbox_messages

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "browser-test-token"


def artifacts() -> Path:
    base = Path(os.environ.get("OUTBOX_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    folder = base / "dashboard"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture
def browser(chromium: tuple[str, str]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(30)
    try:
        yield session
    finally:
        session.quit()


def status_of(engine: Any, message_id: str) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(select(outbox_messages.c.status)
                               .where(outbox_messages.c.message_id == message_id)))


def test_an_operator_lists_filters_opens_and_replays_in_chromium(
    browser: Any, tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = f"sqlite:///{tmp_path / 'bank1.db'}"
    engine = outbox.create_engine(url)
    outbox.metadata.create_all(engine)
    seeded: Seeded = seed(engine, sent=60)
    shots = artifacts()
    taken: list[Path] = []

    def shot(name: str) -> None:
        path = shots / f"{len(taken) + 1:02d}-{name}.png"
        assert browser.save_screenshot(str(path)), path
        taken.append(path)

    def follow(element: Any) -> None:
        """Click what leads to another page, and wait until that page is there."""
        page = browser.find_element(By.TAG_NAME, "html")
        element.click()
        WebDriverWait(browser, 20).until(staleness_of(page))

    def rows() -> list[str]:
        return [a.text for a in browser.find_elements(
            By.CSS_SELECTOR, "#messages td.id a")]

    with dashboard_process("--db", url, token=TOKEN) as (base, _lines):
        browser.get(base + "/db/0")
        assert browser.find_element(By.ID, "dead").text == "6"
        assert browser.find_element(By.ID, "pending").text == str(len(seeded.pending))
        shot("overview")

        follow(browser.find_element(By.LINK_TEXT, "Messages"))
        assert len(rows()) == 50  # one page of the 71 rows, newest first
        assert rows()[0] == max(seeded.pending)
        shot("messages")
        follow(browser.find_element(By.ID, "next"))
        assert len(rows()) == 71 - 50
        shot("messages-page-2")

        browser.get(base + "/db/0/messages")
        Select(browser.find_element(By.NAME, "status")).select_by_value("dead")
        browser.find_element(By.NAME, "error").send_keys("timeout")
        follow(browser.find_element(By.CSS_SELECTOR, "#filter button"))
        assert sorted(rows()) == sorted(seeded.dead_timeout)
        assert "4 dead rows match this filter" in browser.page_source
        shot("filtered-dead")

        target = seeded.dead_timeout[0]
        follow(browser.find_element(By.LINK_TEXT, target))
        assert browser.find_element(By.ID, "status").text == "dead"
        assert '"amount": "10.00"' in browser.find_element(By.ID, "payload").text
        assert "publish timeout" in browser.find_element(By.ID, "last-error").text
        shot("details")

        follow(browser.find_element(By.LINK_TEXT, "Sign in to act"))
        browser.find_element(By.NAME, "token").send_keys(TOKEN)
        follow(browser.find_element(By.CSS_SELECTOR, "#login button"))
        browser.get(base + "/db/0/messages?status=dead&error=timeout")
        browser.find_element(By.CSS_SELECTOR, f'input[value="{target}"]').click()
        follow(browser.find_element(By.CSS_SELECTOR, 'button[value="replay"]'))
        assert "This will replay 1 dead row" in browser.find_element(By.ID, "count").text
        shot("confirm-replay")
        assert status_of(engine, target) == "dead"  # nothing changes before the yes
        follow(browser.find_element(By.CSS_SELECTOR, "#confirm button"))
        assert "Replay: 1 row changed" in browser.find_element(By.ID, "done").text
        shot("replayed")
        assert status_of(engine, target) == "pending"

        browser.get(base + "/db/0/parked")
        assert seeded.parked_key in browser.find_element(By.ID, "parked").text
        shot("parked-keys")
        browser.get(base + f"/db/0/inbox?group=bank2&message_id={seeded.logged}")
        assert seeded.logged in browser.find_element(By.ID, "inbox").text
        shot("inbox-lookup")
        browser.get(base + f"/db/0/check?message_id={seeded.logged}")
        assert browser.find_element(By.ID, "check").text.startswith("COMMIT")
        shot("check-back")
    engine.dispose()
    assert all(p.stat().st_size > 5000 for p in taken), taken
    print("screenshots:", *taken, sep="\n  ")
