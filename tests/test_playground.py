"""The playground page: served as static files (off by a setting), and driven in Debian's headless Chromium through
Playwright against a running server: its strategy menu is the server's; description -> experts, why each was
chosen, chart; a gated description -> the zero-shot state without weights; an error then a success leaves nothing
stale; two images + two texts -> rankings with and without the adapter side by side. Screenshots are saved in the
test's tmp dir beside its other outputs."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from tests.test_service_support import serving, settings_for, threaded_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def test_playground_is_static_and_can_be_turned_off(tiny_build):
    with serving(settings_for(tiny_build.out, redis_url=None, api_key="s3cret")) as client:
        page = client.get("/playground/")  # the page is public; the API calls it makes carry the typed key
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="playground.js"' in page.text and 'id="api-key"' in page.text
        assert client.get("/playground/playground.js").status_code == 200
        assert 'rel="icon"' in page.text and client.get("/playground/favicon.svg").status_code == 200
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
    record = json.loads((ctx.out / "manifest.json").read_text())["artifacts"]["routing"]["record"]
    k = record["strategy_params"][record["default_strategy"]]["k"]

    with threaded_server(settings_for(ctx.out, redis_url=None)) as (app, _, url), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(60_000)  # every wait, not only the explicit ones: Chromium on a busy 2-core box
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/playground/")

            # The menu is the server's list (its OpenAPI enum), with the store's default named.
            page.wait_for_selector("#strategy[data-loaded]")
            offered = page.eval_on_selector_all("#strategy option", "os => os.map(o => o.value)")
            enum = page.request.get(url + "/openapi.json").json()["components"]["schemas"]["GenerateRequest"][
                "properties"]["strategy"]["anyOf"][0]["enum"]
            assert offered[0] == "" and offered[1:] == enum and {"transfer_routed", "delta_merge"} <= set(enum)
            assert record["default_strategy"] in page.inner_text("#strategy option[value='']")

            page.fill("#description", task.description)
            page.click("#generate")
            page.wait_for_selector("#experts-table tr.expert", timeout=60_000)
            assert page.locator("#experts-table tr.expert").count() == k  # the store's validated K
            headers = page.locator("#experts-table th").all_inner_texts()
            assert {"expert ids", "similarities", "weights"} <= set(headers)
            whys = page.locator("#experts-table tr.why").all_inner_texts()  # why each expert was chosen
            assert len(whys) == k and all(w.startswith("why: ") for w in whys)
            assert page.locator("#chart svg rect.bar").count() >= 2 * k  # similarities and weights per expert
            assert "best cosine to any library expert" in page.inner_text("#coverage")
            assert page.locator("link[rel=icon]").count() == 1
            peft_link = page.eval_on_selector("#download-peft", "a => a.href")  # resolved: the API may send a path
            assert peft_link.startswith(url) and peft_link.endswith("?format=peft")
            download = page.request.get(peft_link)
            assert download.status == 200 and download.headers["content-type"] == "application/zip"
            page.screenshot(path=str(tmp_path / "playground-experts.png"), full_page=True)

            # An error, then a success: the error replaces the last answer, the success clears the error.
            page.fill("#k", "100000")
            page.click("#generate")
            page.wait_for_selector("#error:not([hidden])")
            assert "exceeds the library size" in page.inner_text("#error")
            assert page.inner_text("#status") == "" and page.locator("#experts-table").count() == 0
            assert page.locator("#downloads").is_hidden() and page.locator("#coverage").is_hidden()
            page.screenshot(path=str(tmp_path / "playground-error.png"), full_page=True)
            page.fill("#k", "")
            page.click("#generate")
            page.wait_for_selector("#experts-table tr.expert", timeout=60_000)
            assert page.locator("#error").is_hidden() and page.inner_text("#error") == ""
            assert page.inner_text("#status").startswith("adapter ")

            # A gated description: the zero-shot state, the reason and the opt-out; no weights, chart or downloads.
            routing = app.state.engine.store.routing
            original = routing.gate
            routing.gate = replace(original, min_coverage=2.0)  # force the condition: nothing is covered enough
            try:
                page.fill("#seed", "5")  # another cache key than the answers above
                page.click("#generate")
                page.wait_for_selector("#gated:not([hidden])", timeout=60_000)
                gated = page.inner_text("#gated")
                assert gated.startswith("Zero-shot:") and "best cosine" in gated and "< 2.000" in gated
                assert page.locator("#experts-table").count() == 0 and page.locator("#chart svg").count() == 0
                assert page.locator("#downloads").is_hidden() and page.locator("#experts").is_hidden()
                assert not any("weight" in page.inner_text(box).lower() for box in ("#gated", "#coverage", "#status"))
                assert page.inner_text("#status").startswith("zero-shot")
                page.screenshot(path=str(tmp_path / "playground-gated.png"), full_page=True)
                page.click("#ungate")  # the opt-out: the routed adapter anyway
                page.wait_for_selector("#experts-table tr.expert", timeout=60_000)
                assert page.locator("#gated").is_hidden() and page.locator("#downloads").is_visible()
            finally:
                routing.gate = original

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

            page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
            shots = sorted(tmp_path.glob("playground*.png"))
            assert len(shots) == 4 and all(shot.stat().st_size > 10_000 for shot in shots)
            print("screenshots:", *shots)

            # Trace fields other issues add (per-expert numbers, nested scalars) appear without a page change.
            columns, bars = page.locator("#experts-table th").count(), page.locator("#chart svg rect.bar").count()

            def with_extra_fields(route):
                response = route.fetch()
                body = response.json()
                n = len(body["trace"]["expert_ids"])
                body["trace"] |= {"extra_score": [0.1 * (i + 1) for i in range(n)], "extra_gate": {"passed": True}}
                route.fulfill(response=response, json=body)

            page.route("**/generate-lora", with_extra_fields)
            page.fill("#seed", "0")  # the ungated answer cached above (seed 5 was cached gated while forced)
            page.click("#generate")
            page.wait_for_function(f"document.querySelectorAll('#experts-table th').length === {columns + 1}")
            assert "extra score" in page.locator("#experts-table th").all_inner_texts()
            assert page.locator("#chart svg rect.bar").count() == bars + k  # one extra bar per expert
            assert 'extra gate: {"passed":true}' in page.inner_text("#experts")
            page.unroute("**/generate-lora")
        finally:
            browser.close()


def test_playground_refines_on_example_images_with_their_captions(tiny_build, tmp_path):
    """Examples from an unseen task's TRAINING pairs: a missing caption is the server's 422 naming the field; with
    every caption typed, the response's refinement (what the examples did) is shown."""
    sync_playwright = browser_or_skip()
    task = tiny_build.split.unseen[0]
    pairs = task.pairs[:4]
    files = []
    for i, p in enumerate(pairs):
        files.append(tmp_path / f"example{i}.png")
        p.image.save(files[-1])
    with threaded_server(settings_for(tiny_build.out, redis_url=None)) as (_, _, url), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            page.set_default_timeout(60_000)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/playground/")
            page.wait_for_selector("#strategy[data-loaded]")
            page.fill("#description", task.description)
            page.click("#examples-box summary")
            page.set_input_files("#example-images", [str(f) for f in files])
            captions = page.locator("#example-list .example-caption")
            assert captions.count() == 4
            for i, p in enumerate(pairs[:3]):  # the last caption left empty
                captions.nth(i).fill(p.caption)
            page.click("#generate")
            page.wait_for_selector("#error:not([hidden])")
            assert "HTTP 422" in page.inner_text("#error") and "examples" in page.inner_text("#error")
            assert page.locator("#refinement").is_hidden()

            captions.nth(3).fill(pairs[3].caption)
            with page.expect_request("**/generate-lora") as sent:
                page.click("#generate")
            body = json.loads(sent.value.post_data)
            assert [e["caption"] for e in body["examples"]] == [p.caption for p in pairs]
            assert all(e["image"].startswith("data:image/png;base64,") for e in body["examples"])
            page.wait_for_selector("#refinement:not([hidden])", timeout=60_000)
            shown = page.inner_text("#refinement")
            assert "What the examples did" in shown and "examples: 4" in shown and "loss before" in shown
            assert page.locator("#error").is_hidden() and page.inner_text("#status").startswith("adapter ")
            page.screenshot(path=str(tmp_path / "playground-examples.png"), full_page=True)
            assert not errors
        finally:
            browser.close()
