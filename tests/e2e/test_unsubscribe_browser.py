"""A reader unsubscribes in a real browser (Debian's headless Chromium through selenium):
open the unsubscribe link of a digest that reached the SMTP server, press the button, read
the confirmation. The page is checked at a phone's width."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from newsletter import subscriptions
from newsletter.models import SubscriptionStatus
from newsletter.runtime import Runtime
from newsletter.web.app import create_app
from tests.conftest import SmtpServer, free_port, service_unavailable
from tests.web.helpers import (
    body_html,
    events_of,
    make_list,
    send_next_issue,
    serve,
    snapshot,
    subscription_of,
    wait_for,
)

CHROMIUM = os.environ.get("NEWSLETTER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("NEWSLETTER_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
PHONE = (390, 844)  # CSS pixels of a common phone


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        service_unavailable("Chromium", f"{CHROMIUM} or {CHROMEDRIVER} is missing")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    # A phone's viewport (headless windows cannot be narrower than 500 px).
    options.add_experimental_option(
        "mobileEmulation",
        {"deviceMetrics": {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 2.0}},
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_a_reader_unsubscribes_with_the_button_in_a_real_browser(
    pg_url: str,
    smtp_server: SmtpServer,
    make_runtime: Callable[..., Runtime],
    browser: object,
    tmp_path: Path,
) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    assert isinstance(browser, WebDriver)
    port = free_port()
    rt = make_runtime(pg_url, smtp_url=smtp_server.url, base_url=f"http://127.0.0.1:{port}")
    make_list(rt, articles=3)
    with rt.sessions() as s, s.begin():
        subscriptions.add_subscriber(
            s, "ada@example.org", "world", name="Ada", confirmed=True, suppression_key="k"
        )
    send_next_issue(rt)
    [digest] = wait_for(smtp_server.recorder, 1)
    # The link the reader clicks: the footer's "Unsubscribe" in the html part.
    match = re.search(r'href="([^"]+/unsubscribe/[^"]+)"', body_html(digest))
    assert match, "no unsubscribe link in the digest"
    link = match.group(1).replace("&amp;", "&")

    with serve(create_app(rt), port):
        before = snapshot(rt)
        browser.get(link)
        button = browser.find_element(By.CSS_SELECTOR, "button[type=submit]")
        assert button.text == "Unsubscribe"
        assert "Unsubscribe from World Digest?" in browser.find_element(By.TAG_NAME, "h1").text
        assert snapshot(rt) == before  # opening the page changed nothing
        # Readable on a phone: nothing wider than the screen, a button big enough to tap.
        assert browser.execute_script("return window.innerWidth") == PHONE[0]
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        assert button.size["height"] >= 44 and button.size["width"] >= 250
        browser.save_screenshot(str(tmp_path / "unsubscribe-page.png"))

        button.click()
        # While the answer replaces the page, Chromium may fail a look at the old heading
        # with "Node with given id does not belong to the document" (a WebDriverException,
        # not the StaleElementReferenceException a wait ignores by default): look again.
        WebDriverWait(browser, 15, ignored_exceptions=(WebDriverException,)).until(
            expected_conditions.text_to_be_present_in_element(
                (By.TAG_NAME, "h1"), "You have been unsubscribed"
            )
        )
        assert "You will receive no more issues of World Digest." in browser.page_source
        assert browser.current_url == link  # answered in place, no redirect
        browser.save_screenshot(str(tmp_path / "unsubscribed-page.png"))

    assert subscription_of(rt, "ada@example.org").status == SubscriptionStatus.UNSUBSCRIBED
    assert events_of(rt, "ada@example.org")[-1] == ("unsubscribed", "page")
