"""User-agent classification against data the rules were not written from."""

from __future__ import annotations

import crawleruseragents
import pytest
from fake_useragent.utils import load as load_browser_user_agents

from services.fraud.bots import CACHED_UA_MAX, BotDetector, UaKind, shared_bot_detector

IN_APP = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 "
    "Instagram 309.0.2.23.108 (iPhone14,2; iOS 17_1; en_US; en; scale=3.00; 1170x2532; 541597019)",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148 "
    "[FBAN/FBIOS;FBDV/iPhone13,2;FBMD/iPhone;FBSN/iOS;FBSV/17.0;FBSS/3;FBID/phone;FBLC/en_US;FBOP/5]",
    "Mozilla/5.0 (Linux; Android 12; Pixel 6 Build/SD1A.210817.036; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/118.0.5993.111 Mobile Safari/537.36 [FB_IAB/FB4A;FBAV/440.0.0.31.105;]",
    "Mozilla/5.0 (Linux; Android 12; SM-A525F Build/SP1A.210812.016; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/117.0.5938.140 Mobile Safari/537.36 trill_310203 JsSdk/1.0 NetType/WIFI "
    "Channel/googleplay AppName/trill app_version/31.2.3 ByteLocale/en Region/DE BytedanceWebview/d8a21c6",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148 Snapchat/12.60.0.41 (like Safari/8617.2.4.10.8, panda)",
    "Mozilla/5.0 (Linux; Android 13; SM-G991B Build/TP1A.220624.014; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/119.0.6045.163 Mobile Safari/537.36 [Pinterest/Android]",
    "Pinterest for Android/11.40.0 (SM-G991B; 13)",
]
AUTOMATION = [
    "curl/8.4.0", "python-requests/2.31.0", "Go-http-client/1.1", "okhttp/4.12.0", "Java/17.0.9",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.6099.109 Safari/537.36",
    "Mozilla/5.0 (Unknown; Linux x86_64) AppleWebKit/538.1 (KHTML, like Gecko) PhantomJS/2.1.1 Safari/538.1",
    "Wget/1.21.4", "PostmanRuntime/7.36.0", "Apache-HttpClient/4.5.13 (Java/11.0.2)",
]
GPTBOT = "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; +https://openai.com/gptbot)"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.fixture(scope="module")
def bots() -> BotDetector:
    return shared_bot_detector()


def test_matcher_agrees_with_the_package(bots: BotDetector) -> None:
    """Our indexed matcher gives the package's answer on its own examples and on real browsers."""
    samples = [i for entry in crawleruseragents.CRAWLER_USER_AGENTS_DATA for i in entry.get("instances", [])]
    samples += [entry["useragent"] for entry in load_browser_user_agents()[:500]]
    disagreements = [ua for ua in samples if (bots.crawlers.match(ua) is not None) != crawleruseragents.is_crawler(ua)]
    assert disagreements == []


def test_browsers_pass(bots: BotDetector) -> None:
    browsers = [entry["useragent"] for entry in load_browser_user_agents()]
    flagged = [ua for ua in browsers if bots.classify(ua).is_bot]
    # fake-useragent ships one or two entries wrapped in quotes, which no browser sends.
    assert len(flagged) / len(browsers) < 0.001, flagged[:5]


@pytest.mark.parametrize("ua", IN_APP)
def test_in_app_browsers_pass(bots: BotDetector, ua: str) -> None:
    assert not bots.classify(ua).is_bot


@pytest.mark.parametrize("ua", AUTOMATION)
def test_automation_is_caught(bots: BotDetector, ua: str) -> None:
    assert bots.classify(ua).is_bot


def test_empty_user_agent(bots: BotDetector) -> None:
    assert bots.classify("").kind is UaKind.EMPTY
    assert bots.classify("   ").kind is UaKind.EMPTY


def test_spoofed_crawlers(bots: BotDetector) -> None:
    gptbot = bots.classify(GPTBOT)
    assert gptbot.kind is UaKind.CRAWLER and gptbot.claimed_name == "GPTBot"
    assert bots.is_spoof(gptbot, "203.0.113.9")
    assert not bots.is_spoof(gptbot, "20.171.206.10")  # inside OpenAI's published range
    googlebot = bots.classify(GOOGLEBOT)
    assert bots.is_spoof(googlebot, "203.0.113.9")
    assert not bots.is_spoof(googlebot, "66.249.66.1")
    assert not bots.is_spoof(googlebot, "")  # no IP, nothing to check
    assert not bots.is_spoof(bots.classify("curl/8.0"), "203.0.113.9")


def test_the_cache_is_bounded_and_skips_long_user_agents() -> None:
    detector = BotDetector(cache_size=8)
    long_ua = "Mozilla/5.0 (X11; Linux x86_64) " + "x" * CACHED_UA_MAX
    assert not detector.classify(long_ua).is_bot and detector._cached.cache_info().currsize == 0
    for i in range(20):
        detector.classify(f"Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/{i}.0 Safari/537.36")
    assert detector._cached.cache_info().currsize == 8
