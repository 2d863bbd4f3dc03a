"""The playground page: served as static files (off by a setting), and driven in Debian's headless Chromium through
Playwright against a running server: description -> experts and chart; two images + two texts -> rankings with and
without the adapter side by side; a screenshot saved to reports/playground.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.live_server import ROOT, live_server
from tests.test_service_support import serving, settings_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOT = ROOT / "reports" / "playground.png"


def test_playground_is_static_and_can_be_turned_off(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None, api_key="s3cret")) as client:
        page = client.get("/playground/")  # the page is public; the API calls it makes carry the typed key
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="playground.js"' in page.text and 'id="api-key"' in page.text
        assert client.get("/playground/playground.js").status_code == 200
        assert client.get("/experts").status_code == 401
        assert client.get("/experts", headers={"X-API-Key": "s3cret"}).status_code == 200
    with serving(settings_for(tiny_build.out, redis_url=None, playground=False)) as client:
        assert client.get("/playground/").status_code == 404


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the python package 'playwright' is missing (pip install -e '.[dev]')")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"Debian's chromium is missing at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)")
    return sync_playwright


def test_playground_in_headless_chromium(tiny_build, tmp_path):
    sync_playwright = browser_or_skip()
    ctx = tiny_build
    task = ctx.split.unseen[0]
    pairs = ctx.split.test_pairs[task.name][:2]
    images = []
    for i, p in enumerate(pairs):
        images.append(tmp_path / f"image{i}.png")
        p.image.resize((96, 96)).save(images[-1])

    with live_server(ctx.out) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(60_000)  # every wait, not only the explicit ones: Chromium on a busy 2-core box
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/playground/")
            page.fill("#description", task.description)
            page.click("#generate")
            page.wait_for_selector("#experts-table tr.expert", timeout=60_000)
            rows = page.locator("#experts-table tr.expert")
            record = json.loads((ctx.out / "manifest.json").read_text())["artifacts"]["routing"]["record"]
            k = record["strategy_params"][record["default_strategy"]]["k"]
            assert rows.count() == k  # the store's validated K for its default strategy
            headers = page.locator("#experts-table th").all_inner_texts()
            assert {"expert ids", "similarities", "weights"} <= set(headers)
            assert page.locator("#chart svg rect.bar").count() >= 2 * k  # similarities and weights per expert
            assert "best cosine" in page.inner_text("#coverage")
            peft_link = page.eval_on_selector("#download-peft", "a => a.href")  # resolved: the API may send a path
            assert peft_link.startswith(url) and peft_link.endswith("?format=peft")
            download = page.request.get(peft_link)
            assert download.status == 200 and download.headers["content-type"] == "application/zip"


            page.set_input_files("#images", [str(p) for p in images])
            page.fill("#texts", "\n".join(p.caption for p in pairs))
            page.click("#rank")
            page.wait_for_selector("#rankings-adapted tr.ranked", timeout=60_000)
            for side in ("#rankings-base", "#rankings-adapted"):
                assert page.locator(f"{side} table.image-to-text tr.ranked").count() == 2
                assert page.locator(f"{side} table.text-to-image tr.ranked").count() == 2
            assert "no adapter" in page.inner_text("#rankings-base")
            assert "adapter_id" in page.inner_text("#rankings-adapted")
            assert page.inner_text("#error") == "" and not errors

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert SCREENSHOT.stat().st_size > 10_000

            # Trace fields other issues add (per-expert numbers, nested scalars) appear without a page change.
            columns, bars = page.locator("#experts-table th").count(), page.locator("#chart svg rect.bar").count()

            def with_extra_fields(route):
                response = route.fetch()
                body = response.json()
                n = len(body["trace"]["expert_ids"])
                body["trace"] |= {"extra_score": [0.1 * (i + 1) for i in range(n)], "extra_gate": {"passed": True}}
                route.fulfill(response=response, json=body)

            page.route("**/generate-lora", with_extra_fields)
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('#experts-table th').length === {columns + 1}")
            assert "extra score" in page.locator("#experts-table th").all_inner_texts()
            assert page.locator("#chart svg rect.bar").count() == bars + k  # one extra bar per expert
            assert 'extra gate: {"passed":true}' in page.inner_text("#experts")
            page.unroute("**/generate-lora")
        finally:
            browser.close()
