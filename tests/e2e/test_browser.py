"""A real browser follows a tracking link: headless Chromium, the three services, a landing page of ours.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); without
them the test is skipped and says what to install.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from aiohttp import web
from ascribe.attribution.v1 import attribution_pb2 as pb
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.e2e.world import LiveWorld

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# Headless Chromium says "HeadlessChrome" in its user agent, which the fraud
# service's crawler patterns (rightly) score as a bot, rejecting the click. A
# person's desktop Chrome is what this test stands in for, so it says so.
DESKTOP_CHROME_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0.0.0 Safari/537.36"
)

# Every blocking WebDriver call is bounded: a hung browser fails the test, not CI.
DRIVER_TIMEOUT_SECONDS = 60.0
PAGE_LOAD_TIMEOUT_SECONDS = 30

T = TypeVar("T")


async def blocking(call: Callable[[], T]) -> T:
    """Runs a WebDriver call in a thread, so the event loop serving the landing page keeps running."""
    return await asyncio.wait_for(asyncio.to_thread(call), timeout=DRIVER_TIMEOUT_SECONDS)


@dataclass
class Landing:
    url: str
    served: list[str] = field(default_factory=list)  # path and query of every request it answered


@pytest.fixture
async def landing() -> AsyncIterator[Landing]:
    """The shop's landing page, on a port of its own, recording what it was asked for."""
    page = Landing(url="")

    async def serve(request: web.Request) -> web.Response:
        page.served.append(str(request.rel_url))
        return web.Response(text="<!doctype html><title>Summer sale</title><h1>Summer sale</h1>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/landing", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        page.url = f"http://127.0.0.1:{port}/landing"
        yield page
    finally:
        await runner.cleanup()


def _start_chromium(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",  # we run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--user-agent={DESKTOP_CHROME_UA}",
    ):
        options.add_argument(flag)
    # The system chromedriver, named explicitly, so Selenium Manager never
    # tries to download a driver or a browser.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_SECONDS)
    return driver


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[webdriver.Chrome]:
    """Headless Chromium under the system chromedriver; skips, saying why, where they are not installed."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.skip(
            f"no headless browser: {' and '.join(missing)} not found; "
            "install Debian's packages with `apt-get install chromium chromium-driver`"
        )
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = await blocking(lambda: _start_chromium(profile))
    try:
        yield driver
    finally:
        await blocking(driver.quit)


# `browser` comes first, so a machine without Chromium skips before starting the services.
async def test_a_browser_follows_a_tracking_link_to_the_landing_page(
    browser: webdriver.Chrome, landing: Landing, live: LiveWorld
) -> None:
    await live.setup_campaign(id="cmp-browser", landing_url=f"{landing.url}?utm_source=aff")
    await live.catalog.CreateAffiliate(
        pb.CreateAffiliateRequest(affiliate=pb.Affiliate(id="aff-browser", name="Browser", channel="social")),
        timeout=10,
    )
    await live.catalog.CreateCoupon(
        pb.CreateCouponRequest(coupon=pb.Coupon(
            campaign_id="cmp-browser", code="SUMMER150", usage_limit=150, affiliate_ids=["aff-browser"],
        )),
        timeout=10,
    )
    link = f"{live.url}/click?" + urlencode(
        {"campaign_id": "cmp-browser", "aff_id": "aff-browser", "coupon": "summer150"}
    )

    await blocking(lambda: browser.get(link))
    address = await blocking(lambda: browser.current_url)

    seen = urlsplit(address)
    landing_parts = urlsplit(landing.url)
    assert (seen.scheme, seen.netloc, seen.path) == (
        landing_parts.scheme, landing_parts.netloc, landing_parts.path
    ), address
    query = parse_qs(seen.query)
    assert query["utm_source"] == ["aff"], address
    assert query["coupon"] == ["SUMMER150"], address
    [click_id] = query["click_id"]

    click = await live.get_click(click_id)
    assert click.click_id == click_id
    assert click.decision == pb.CLICK_DECISION_ACCEPTED, list(click.reasons)
    assert click.coupon_code == "SUMMER150"
    # The browser connects from loopback without X-Forwarded-For: its peer
    # address is the client, and no IP list holds loopback.
    assert click.ip == "127.0.0.1"
    assert click.user_agent == DESKTOP_CHROME_UA

    landed = [parse_qs(urlsplit(path).query) for path in landing.served if urlsplit(path).path == "/landing"]
    assert [q.get("click_id") for q in landed] == [[click_id]], landing.served
