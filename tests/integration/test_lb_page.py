"""The LB's live page in a real browser (Playwright driving Debian's Chromium, headless),
against a real ``mesh lb`` with three backends; and its /events stream over a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time

import aiohttp
import pytest

from tests.integration.test_lb_support import LBProcess, backends, curl

pytestmark = pytest.mark.one_loop

CHROMIUM = shutil.which("chromium")
# What a browser needs on a closed network: nothing that calls home.
CHROMIUM_ARGS = [
    "--disable-background-networking", "--disable-component-update", "--no-first-run",
    "--disable-sync", "--disable-quic",
]  # fmt: skip
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs it when root)"
)


def lb_args(bs) -> tuple[str, ...]:
    return (
        "--endpoints", ",".join(b.key for b in bs), "--policy", "maglev",
        "--hash-on", "header:x-user", "--retries", "2",
    )  # fmt: skip


@contextlib.asynccontextmanager
async def browser_page(tmp_path, url: str):
    """A headless Chromium page opened at ``url``; its screenshot is saved in ``tmp_path``
    when the test is done with it, and a script error on the page fails the test."""
    from playwright.async_api import async_playwright

    pw = await async_playwright().start()
    browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    page = await browser.new_page(viewport={"width": 1500, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        await page.goto(url)
        yield page
    finally:
        await page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        await browser.close()
        await pw.stop()
    assert errors == []


async def traffic(lb: LBProcess, users: range) -> list[int]:
    async with aiohttp.ClientSession() as s:
        out = []
        for u in users:
            async with s.get(lb.url + "/", headers={"X-User": f"user-{u}"}) as r:
                await r.read()
                out.append(r.status)
        return out


@needs_browser
async def test_the_page_lists_the_endpoints_and_shows_an_ejection_without_a_reload(tmp_path):
    async with (
        backends(3) as bs,
        LBProcess(*lb_args(bs)) as lb,
        browser_page(tmp_path, lb.admin + "/") as page,
    ):
        await page.wait_for_function("document.querySelectorAll('tr[data-endpoint]').length === 3")
        rows = await page.eval_on_selector_all(
            "tr[data-endpoint]", "rs => rs.map(r => r.dataset.endpoint)"
        )
        assert sorted(rows) == sorted(b.key for b in bs)
        assert await traffic(lb, range(60)) == [200] * 60
        await page.evaluate("window.sameDocument = true")
        victim = bs[1]
        await victim.stop()
        killed = time.monotonic()
        # The requests whose home it was fail to connect there, are retried elsewhere
        # (the client sees 200), and eject it after three such failures in a row.
        assert await traffic(lb, range(60, 120)) == [200] * 60
        row = f'tr.ejected[data-endpoint="{victim.key}"]'
        left = 2.0 - (time.monotonic() - killed)
        await page.wait_for_selector(row, timeout=max(0.1, left) * 1000)
        shown = time.monotonic() - killed
        print(f"ejected on the page {shown:.2f} s after the backend stopped")
        text = await page.inner_text(row)
        assert "ejected: consecutive" in text, text
        assert await page.evaluate("window.sameDocument") is True  # no reload
        log = await page.inner_text("#log")
        assert f"{victim.key}: eject" in log


@needs_browser
async def test_the_key_box_shows_what_ring_answers(tmp_path):
    async with backends(3) as bs, LBProcess(*lb_args(bs)) as lb:
        async with (
            aiohttp.ClientSession() as s,
            s.get(lb.admin + "/ring", params={"key": "alice"}) as r,
        ):
            ring = await r.json()
        async with browser_page(tmp_path, lb.admin + "/") as page:
            await page.wait_for_selector("#keycluster option", state="attached")
            await page.fill("#key", "alice")
            await page.click("#keyform button")
            await page.wait_for_selector('dd[data-field="chosen"]')
            shown = {
                f: await page.inner_text(f'dd[data-field="{f}"]')
                for f in ("chosen", "home", "key hash", "hash input")
            }
            assert shown == {
                "chosen": ring["endpoint"],
                "home": ring["home"],
                "key hash": str(ring["key_hash"]),
                "hash input": ring["hash_input"],
            }


@needs_browser
async def test_a_stopped_stream_is_said_and_offers_a_retry(tmp_path):
    async with backends(3) as bs:
        lb = await LBProcess(*lb_args(bs)).start()
        try:
            async with browser_page(tmp_path, lb.admin + "/") as page:
                await page.wait_for_selector("tr[data-endpoint]")
                assert await page.is_hidden("#stream")
                lb.proc.send_signal(signal.SIGKILL)
                await lb.proc.wait()
                await page.wait_for_selector("#stream", state="visible", timeout=5000)
                assert "stream stopped" in await page.inner_text("#stream")
                await page.click("#retry")  # the LB is still gone: said again
                await page.wait_for_selector("#stream", state="visible", timeout=5000)
        finally:
            await lb.stop()


@needs_browser
async def test_names_and_prefixes_from_config_are_shown_as_text(tmp_path):
    hostile = "<script>window.pwned = 1</script><img src=x onerror='window.pwned = 2'>"
    async with backends(2) as bs:
        cfg = tmp_path / "lb.toml"
        cfg.write_text(
            f"""
[[route]]
name = {json.dumps("web " + hostile)}
prefix = {json.dumps("/" + hostile)}
endpoints = ["{bs[0].key}"]
[[route]]
endpoints = ["{bs[1].key}"]
"""
        )
        async with (
            LBProcess("--config", str(cfg)) as lb,
            browser_page(tmp_path, lb.admin + "/") as page,
        ):
            await page.wait_for_selector(".routes")
            text = await page.inner_text("#clusters")
            assert f"cluster web {hostile}" in text
            assert f"/{hostile}" in text
            assert await page.evaluate("window.pwned") is None
            scripts = await page.eval_on_selector_all("script", "s => s.length")
            assert scripts == 1  # the page's own
            assert await page.eval_on_selector_all("#clusters img", "s => s.length") == 0


async def read_events(
    resp: aiohttp.ClientResponse, until, timeout: float
) -> list[tuple[str, dict]]:
    """Server-sent events as (event, data) until ``until(events)`` holds."""
    events: list[tuple[str, dict]] = []
    kind = None
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind or "message", json.loads(line[6:])))
                if until(events):
                    return events
    return events


async def test_events_stream_state_and_log_and_json():
    async with backends(3) as bs, LBProcess(*lb_args(bs)) as lb, aiohttp.ClientSession() as s:
        async with s.get(lb.admin + "/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            got = await read_events(resp, lambda ev: any(k == "state" for k, _ in ev), 10)
            state = next(d for k, d in got if k == "state")
            (cluster,) = state["clusters"]
            assert {e["address"] for e in cluster["endpoints"]} == {b.key for b in bs}
            assert all(0.2 < e["table_share"] < 0.5 for e in cluster["endpoints"])
            await bs[2].stop()
            assert await traffic(lb, range(60)) == [200] * 60
            got = await read_events(
                resp, lambda ev: any(k == "log" and d["kind"] == "eject" for k, d in ev), 10
            )
            eject = next(d for k, d in got if k == "log" and d["kind"] == "eject")
            assert eject["endpoint"] == bs[2].key and eject["cluster"] == "static"
        async with s.get(lb.admin + "/events", params={"format": "json"}) as r:
            kinds = [(e["kind"], e["endpoint"]) for e in (await r.json())["events"]]
        assert ("eject", bs[2].key) in kinds
        assert kinds[0] in (("table", ""), ("endpoints", ""))


async def test_an_open_event_stream_does_not_hold_up_sigterm():
    """A page left open must not keep the LB from exiting: aiohttp's shutdown would wait up
    to a minute for a stream that never ends. SIGKILL (exit code -9) after 10 s."""
    async with backends(2) as bs, aiohttp.ClientSession() as s:
        lb = await LBProcess(*lb_args(bs)).start()
        try:
            async with s.get(lb.admin + "/events") as resp:
                await read_events(resp, lambda ev: len(ev) >= 1, 10)
                started = time.monotonic()
                rc = await lb.stop(timeout=10)
                took = time.monotonic() - started
                async with asyncio.timeout(5):
                    await resp.content.read()  # the stream ended with the LB
        finally:
            await lb.stop()
    print(f"mesh lb exited {took:.2f} s after SIGTERM with a page open")
    assert rc == 0


async def test_with_workers_the_stream_sums_counters_and_shows_each_workers_view():
    async with backends(3) as bs, LBProcess(*lb_args(bs), "--workers", "2") as lb:
        # New connections each: SO_REUSEPORT spreads them over both workers.
        for u in range(60):
            rc, out, err = await curl("-H", f"X-User: user-{u}", lb.url + "/")
            assert rc == 0, err
        async with aiohttp.ClientSession() as s, s.get(lb.admin + "/events") as resp:
            got = await read_events(resp, lambda ev: any(k == "state" for k, _ in ev), 10)
    state = next(d for k, d in got if k == "state")
    assert state["workers"] == 2 and state["workers_silent"] == 0
    (cluster,) = state["clusters"]
    assert sum(e["requests"] for e in cluster["endpoints"]) == 60
    for e in cluster["endpoints"]:
        assert [w["worker"] for w in e["workers"]] == [0, 1]
        assert all(w["usable"] for w in e["workers"])
        assert sum(e["latency_buckets"]) == e["requests"]


@needs_browser
async def test_updates_pause_while_the_tab_is_hidden(tmp_path):
    async with (
        backends(2) as bs,
        LBProcess(*lb_args(bs)) as lb,
        browser_page(tmp_path, lb.admin + "/") as page,
    ):
        await page.wait_for_selector("tr[data-endpoint]")

        async def updated_changes() -> bool:
            before = await page.inner_text("#updated")
            await asyncio.sleep(1.6)  # three state events at 0.5 s
            return await page.inner_text("#updated") != before

        assert await updated_changes()
        await page.evaluate(HIDE)
        await asyncio.sleep(0.2)
        assert not await updated_changes()
        assert await page.is_hidden("#stream")  # paused, not broken
        await page.evaluate(SHOW)
        assert await updated_changes()


# A hidden tab, as the page sees one: document.hidden and its visibilitychange event.
HIDE = """() => {
  Object.defineProperty(document, "hidden", { value: true, configurable: true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""
SHOW = """() => {
  Object.defineProperty(document, "hidden", { value: false, configurable: true });
  document.dispatchEvent(new Event("visibilitychange"));
}"""
