"""The Playground's History view in a real browser (Chromium via Playwright, as tests/test_playground.py): search,
open an entry (its image and parameters), re-run it with the same seed (the same bytes come back), use its image as
a reference for an edit, delete it."""

from __future__ import annotations

import base64
import uuid

from imaging import generate
from test_playground import browser, page  # noqa: F401 (the browser fixtures)


def _shown_png(tab, selector: str) -> bytes:
    src = tab.get_attribute(selector, "src")
    assert src.startswith("data:image/png;base64,")
    return base64.b64decode(src.split(",", 1)[1])


def test_history_view_search_open_rerun_and_use_as_reference(server, client, page):  # noqa: F811
    word = uuid.uuid4().hex[:10]
    made = generate(
        client, prompt=f"harbour {word}", size="48x32", seed=7, num_inference_steps=2, response_format="b64_json"
    )
    original = base64.b64decode(made.data[0].b64_json)

    page.goto(server.base_url + "/")
    page.wait_for_selector("#model option:nth-child(2)", state="attached")
    page.click("#tab-history")
    assert page.is_visible("#hsearch") and not page.is_visible("#go >> xpath=ancestor::section")
    page.fill("#hsearch", "no such prompt " + word)
    page.wait_for_function("() => document.getElementById('hstatus').textContent === 'Nothing matches.'")
    page.fill("#hsearch", word)
    page.wait_for_selector(".hitem")
    assert page.locator(".hitem").count() == 1
    item = page.inner_text(".hitem")
    assert f"harbour {word}" in item and "48x32" in item and "seed 7" in item

    # Open it: its image (fetched from the files route) and its parameters.
    page.click(".hitem")
    page.wait_for_function("() => { const i = document.querySelector('#himages img'); return i && i.naturalWidth; }")
    size = page.evaluate(
        "() => { const i = document.querySelector('#himages img'); return [i.naturalWidth, i.naturalHeight]; }"
    )
    assert size == [48, 32]  # its bytes are checked below, once they become a reference
    parameters = page.inner_text("#hparams")
    assert '"seed": 7' in parameters and '"size": "48x32"' in parameters and '"num_inference_steps": 2' in parameters

    # Re-run: the form takes the entry's parameters and seed, generates, and the same bytes come back.
    page.click("#hrerun")
    assert page.is_visible("#status") and not page.is_visible("#hsearch")
    assert (page.input_value("#seed"), page.input_value("#size"), page.input_value("#steps")) == ("7", "48x32", "2")
    assert page.input_value("#prompt") == f"harbour {word}"
    page.wait_for_selector("figure.result img")
    assert _shown_png(page, "figure.result img") == original

    # The re-run is in the history too; the first entry's image becomes a reference for an edit.
    page.click("#tab-history")
    page.wait_for_function("() => document.querySelectorAll('.hitem').length === 2")
    page.locator(".hitem").nth(1).click()
    page.wait_for_function(
        "() => { const b = document.querySelector('.huse'); return b && !b.disabled && "
        "document.querySelector('#himages img').naturalWidth; }"
    )
    page.click(".huse")
    assert page.locator("#thumbs .thumb").count() == 1 and page.inner_text("#go") == "Edit with 1 reference"
    reference = page.evaluate("async () => Array.from(new Uint8Array(await references[0].file.arrayBuffer()))")
    assert bytes(reference) == original
    page.fill("#seed", "")
    page.click("#go")
    page.wait_for_function("() => document.querySelectorAll('figure.result').length === 2")
    assert page.evaluate("document.querySelector('figure.result img').naturalWidth") == 48  # the reference's size

    # Delete the re-run's entry from the view: gone from the list.
    page.click("#tab-history")
    page.fill("#hsearch", word)
    page.wait_for_function("() => document.querySelectorAll('.hitem').length === 3")  # original, re-run, edit
    page.locator(".hitem").first.click()
    page.click("#hdelete")
    page.wait_for_function("() => document.querySelectorAll('.hitem').length === 2")
    assert page.console_errors == []
