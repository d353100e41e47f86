"""The Playground's History view in a real browser (Chromium via Playwright, as tests/test_playground.py): search,
open an entry (its image and parameters), re-run it with the same seed (the same bytes come back), use its image as
a reference for an edit, delete it."""

from __future__ import annotations

import base64
import uuid

from imaging import generate
from test_playground import browser, page  # noqa: F401 (the browser fixtures)

# The list shows one entry, and it holds the searched words (the list before the search has settled does not).
ONLY_ITEM = (
    "w => { const i = document.querySelectorAll('.hitem'); return i.length === 1 && i[0].textContent.includes(w); }"
)


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


def test_a_rerun_is_made_as_its_entry_was_and_keeps_a_seed_past_2_to_the_53(server, client, page, tmp_path):  # noqa: F811
    """Seeds past 2^53 came back rounded (9223372036854775807 sent as ...6000, a 400); a generation's re-run with a
    reference left in the form went to /edits, an edit's without its images to /generations."""
    from hostile_images import png

    word = uuid.uuid4().hex[:10]
    top = 2**63 - 1
    made = generate(
        client, prompt=f"dunes {word}", size="32x32", seed=top, num_inference_steps=1, response_format="b64_json"
    )
    assert made.data[0].model_extra["seed"] == top
    edit = client.images.edit(
        image=("a.png", png(32, 32)), prompt=f"snow {word}", extra_body={"num_inference_steps": 1}
    )
    assert edit.data

    (tmp_path / "left.png").write_bytes(png(48, 48))
    page.goto(server.base_url + "/")
    page.wait_for_selector("#model option:nth-child(2)", state="attached")
    page.set_input_files("#files", str(tmp_path / "left.png"))  # a reference left over from earlier work
    page.click("#tab-history")
    page.fill("#hsearch", f"dunes {word}")
    page.wait_for_function(ONLY_ITEM, arg=f"dunes {word}")
    assert f"seed {top}" in page.inner_text(".hitem")
    page.click(".hitem")
    page.wait_for_function(
        "() => document.querySelector('#himages img') && document.querySelector('#himages img').naturalWidth"
    )
    assert f'"seed": {top}' in page.inner_text("#hparams")
    with page.expect_request("**/v1/images/**") as sent:
        page.click("#hrerun")
    assert sent.value.url.endswith("/v1/images/generations") and f'"seed":{top},' in sent.value.post_data
    page.wait_for_selector("figure.result img")
    assert _shown_png(page, "figure.result img") == base64.b64decode(made.data[0].b64_json)
    assert f"seed {top}" in page.inner_text("figure.result figcaption")
    assert page.locator("#thumbs .thumb").count() == 0 and page.inner_text("#go") == "Generate"

    page.click("#tab-history")
    page.fill("#hsearch", f"snow {word}")
    page.wait_for_function(ONLY_ITEM, arg=f"snow {word}")
    page.click(".hitem")
    page.click("#hrerun")  # an edit, and no image to edit in the form: nothing is sent, the note says what to do
    assert "add them again" in page.inner_text("#hrefnote") and page.is_visible("#hsearch")
    assert page.locator("figure.result").count() == 1
    assert page.console_errors == []
