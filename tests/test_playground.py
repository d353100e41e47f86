"""The Playground page in a real browser (Debian's Chromium driven by Playwright): generate at once with the
prefilled prompt, live previews that give way to the image, the Python snippet run for real, edit with three
uploaded references, the test-model banner, placeholders that fit, an API error in plain words, keys and the open
mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import RunningServer
from hostile_images import png
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("CI must have Chromium for the browser tests (.ci/run installs it)")
        pytest.skip("browser tests need Chromium: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    yield page
    context.close()


def natural_size(page, selector):
    return tuple(
        page.evaluate(
            f"() => {{ const i = document.querySelector('{selector}'); return [i.naturalWidth, i.naturalHeight]; }}"
        )
    )


def count_previews_shown(page):
    """From now on, window.previewsShown counts the preview images the page adds (they are gone by the end)."""
    page.evaluate("""() => { window.previewsShown = 0;
        new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach((node) => {
          if (node.matches && node.matches("img.preview")) window.previewsShown += 1; })))
        .observe(document.getElementById("previews"), {childList: true}); }""")


def test_generate_works_at_once_with_the_prefilled_prompt(server, page):
    page.goto(server.base_url + "/")
    page.wait_for_selector("#model option:nth-child(2)", state="attached")
    assert page.input_value("#prompt").strip()  # real, editable text, not a placeholder
    page.click("#go")
    page.wait_for_selector("figure.result img", timeout=120_000)
    assert page.inner_text("#status").startswith("Done: 1 image")
    assert not page.is_visible("#error")
    # A really empty box still gets a plain answer instead of a request.
    page.fill("#prompt", "  ")
    page.click("#go")
    assert page.inner_text("#error") == "Write a prompt first."
    assert page.locator("figure.result").count() == 1
    assert page.console_errors == []


def test_generate_shows_previews_then_the_image_at_the_chosen_size(server, page, tmp_path):
    page.goto(server.base_url + "/")
    assert page.title() == "flux2-local · Playground"
    page.wait_for_selector("#model option:nth-child(2)", state="attached")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#size", "96x64")
    page.fill("#steps", "8")
    page.click("#dice")
    seed = page.input_value("#seed")
    assert seed.isdigit()
    count_previews_shown(page)
    page.click("#go")
    page.wait_for_selector("figure.result img")
    assert page.evaluate("window.previewsShown") == 3  # shown while it ran...
    assert page.locator("#previews img").count() == 0  # ...and gone once the image is there
    assert natural_size(page, "figure.result img") == (96, 64)
    caption = page.inner_text("figure.result figcaption")
    assert "96x64" in caption and f"seed {seed}" in caption
    assert page.get_attribute("figure.result a", "download").endswith(".png")
    assert page.inner_text("#status").startswith("Done: 1 image")
    page.click("summary")
    assert '"size": "96x64"'.replace(" ", "") in page.inner_text("#curl").replace(" ", "")
    assert "client.images.generate(" in page.inner_text("#python")
    page.screenshot(path=str(tmp_path / "playground-generate.png"), full_page=True)
    assert page.console_errors == []


def test_the_python_snippet_saves_the_image(server, page, tmp_path):
    page.goto(server.base_url + "/")
    page.wait_for_selector("#model option:nth-child(2)", state="attached")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#size", "48x32")
    page.fill("#steps", "2")
    page.fill("#seed", "7")
    page.select_option("#format", "webp")
    snippet = page.text_content("#python")
    assert 'open("image.webp", "wb").write(base64.b64decode(result.data[0].b64_json))' in snippet
    # Run as a user would: the OpenAI SDK, this server, a file written where it runs.
    run = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with Image.open(tmp_path / "image.webp") as image:
        assert (image.format, image.size) == ("WEBP", (48, 32))
    # Several images are saved one file each, and JPEG files end in .jpg.
    page.fill("#n", "2")
    page.select_option("#format", "jpeg")
    snippet = page.text_content("#python")
    assert 'open(f"image-{i + 1}.jpg", "wb").write(base64.b64decode(image.b64_json))' in snippet
    compile(snippet, "snippet", "exec")


def test_edit_with_three_uploaded_references(server, page, tmp_path):
    names = []
    for name, size in (("first.png", (80, 48)), ("second.png", (64, 64)), ("third.png", (32, 48))):
        (tmp_path / name).write_bytes(png(*size))
        names.append(str(tmp_path / name))
    page.goto(server.base_url + "/playground")
    page.fill("#prompt", "put them together")
    page.fill("#steps", "3")
    page.set_input_files("#files", names)
    assert page.locator("#thumbs .thumb").count() == 3
    assert page.inner_text("#go") == "Edit with 3 references"  # one image comes back, made from three
    page.click("summary")
    assert "image[]=@first.png" in page.inner_text("#curl")
    page.keyboard.press("Control+Enter")  # the shortcut
    page.wait_for_selector("figure.result img")
    assert page.locator("figure.result").count() == 1
    assert natural_size(page, "figure.result img") == (80, 48)  # auto size: the first image
    (tmp_path / "hole.png").write_bytes(png(80, 48))
    page.set_input_files("#mask", str(tmp_path / "hole.png"))
    page.dispatch_event("#form", "input")
    assert "mask=@hole.png" in page.inner_text("#curl")  # the snippet is the same request, mask included
    assert 'mask=open("hole.png", "rb")' in page.inner_text("#python")
    page.set_input_files("#mask", [])
    page.locator("#thumbs .thumb button").first.click()
    page.locator("#thumbs .thumb button").first.click()
    assert page.locator("#thumbs .thumb").count() == 1
    assert page.inner_text("#go") == "Edit with 1 reference"
    page.screenshot(path=str(tmp_path / "playground-edit.png"), full_page=True)


def test_a_banner_says_the_test_model_draws_noise(server, page, tmp_path):
    model = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"]
    assert model in httpx.get(f"{server.base_url}/health").json()["test_models"]  # the CLI saw tiny weights
    page.goto(server.base_url + "/")
    page.wait_for_selector("#testbanner", state="visible")
    banner = page.inner_text("#testbanner")
    assert "noise" in banner and model in banner
    assert "flux2-local serve --model /models/FLUX.2-klein-4B" in banner
    page.screenshot(path=str(tmp_path / "playground-banner.png"), full_page=True)

    # What the page does when /health says what a server with real weights says: no banner.
    page.route("**/health", lambda route: route.fulfill(json={**route.fetch().json(), "test_models": []}))
    page.evaluate("() => loadHealth()")
    assert not page.is_visible("#testbanner")


@pytest.mark.parametrize("viewport", [{"width": 1280, "height": 860}, {"width": 375, "height": 800}])
def test_placeholders_fit_their_boxes(server, browser, viewport):
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.goto(server.base_url + "/")
    measured = page.evaluate("""() => {
        const context = document.createElement("canvas").getContext("2d");
        const shown = [...document.querySelectorAll("input[placeholder]")].filter((input) => input.offsetParent);
        return shown.map((input) => {
          const style = getComputedStyle(input);
          context.font = style.font;
          const room = input.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
          return [input.id, context.measureText(input.placeholder).width, room]; }); }""")
    context.close()
    assert {"size", "steps", "guidance", "seed"} <= {name for name, _, _ in measured}
    assert [(name, width, room) for name, width, room in measured if width > room] == []


def test_api_errors_are_shown_in_plain_words(server, page):
    page.goto(server.base_url + "/")
    page.fill("#prompt", "x")
    page.fill("#size", "huge")
    page.click("#go")
    page.wait_for_selector("#error", state="visible")
    text = page.inner_text("#error")
    assert "Invalid size 'huge'" in text and "size" in text
    assert page.locator("figure.result").count() == 0


def test_keys_and_the_open_mode(tiny_klein, tmp_path, browser):
    keyed = RunningServer(["--model", str(tiny_klein), "--api-key", "studio-key"], tmp_path / "keyed")
    opened = RunningServer(
        ["--model", str(tiny_klein), "--api-key", "studio-key", "--playground-open"], tmp_path / "open"
    )
    try:
        keyed.wait_healthy()
        opened.wait_healthy()
        context = browser.new_context()
        page = context.new_page()
        page.goto(keyed.base_url + "/")
        page.wait_for_selector("#keybox", state="visible")
        page.fill("#apikey", "studio-key")
        page.dispatch_event("#apikey", "change")
        page.wait_for_selector("#model option:nth-child(2)", state="attached")
        page.fill("#prompt", "x")
        page.fill("#size", "32x32")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("figure.result img")
        assert page.evaluate("localStorage.getItem('flux2-api-key')") == "studio-key"
        page.reload()  # the stored key is used: no key box, and the snippets still say a key is needed
        page.wait_for_selector("#model option:nth-child(2)", state="attached")
        assert not page.is_visible("#keybox")
        assert "Authorization: Bearer $FLUX2_API_KEY" in page.text_content("#curl")
        assert 'api_key=os.environ["FLUX2_API_KEY"]' in page.text_content("#python")
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.evaluate("document.getElementById('apikey').value = 'clé'")  # no HTTP header can carry it: said
        page.click("#go")
        assert "printable ASCII" in page.inner_text("#error") and errors == []
        context.close()

        context = browser.new_context()
        page = context.new_page()
        page.goto(opened.base_url + "/")
        page.wait_for_selector("#model option:nth-child(2)", state="attached")
        assert not page.is_visible("#keybox")
        page.fill("#prompt", "x")
        page.fill("#size", "32x32")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("figure.result img")
        context.close()
        # The open mode is for the page only: other clients still need the key.
        assert httpx.get(f"{opened.base_url}/v1/models").status_code == 401
        assert (
            httpx.get(
                f"{opened.base_url}/v1/models",
                headers={"x-flux2-playground": "1", "origin": "https://elsewhere.example"},
            ).status_code
            == 401
        )
    finally:
        keyed.stop()
        opened.stop()


def test_a_long_prompt_keeps_the_page_in_the_window_and_references_take_the_keyboard(server, client, browser):
    """A 700-character prompt in the history made the page 6,295 px wide (the form squeezed, the entry's details off
    screen), and the reference images could not be chosen without a mouse."""
    from imaging import generate

    generate(client, prompt="a very long prompt " * 37, size="16x16", num_inference_steps=1, response_format="b64_json")
    for width in (1280, 375):
        context = browser.new_context(viewport={"width": width, "height": 800})
        page = context.new_page()
        page.goto(server.base_url + "/")
        page.wait_for_selector("#model option:nth-child(2)", state="attached")
        page.click("#tab-history")
        page.wait_for_selector(".hitem")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.click("#tab-results")
        page.evaluate("""() => { window.chooserOpened = 0; const files = document.getElementById('files');
            files.click = () => { window.chooserOpened += 1; }; }""")  # the file chooser itself is the browser's
        page.focus("#drop")
        for key in ("Enter", " "):
            page.keyboard.press(key)
        assert page.evaluate("window.chooserOpened") == 2
        assert page.evaluate("document.activeElement.id") == "drop"  # reached like any control (tabindex 0)
        assert page.get_attribute("#drop", "role") == "button" and page.get_attribute("#drop", "tabindex") == "0"
        context.close()


def test_no_playground(tiny_klein, tmp_path):
    with RunningServer(["--model", str(tiny_klein), "--no-playground"], tmp_path) as running:
        assert httpx.get(f"{running.base_url}/").status_code == 404
        assert httpx.get(f"{running.base_url}/playground").status_code == 404


def test_the_page_loads_nothing_from_elsewhere(server):
    response = httpx.get(f"{server.base_url}/")
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    assert "http://" not in html.replace("http://localhost", "") and "https://" not in html
    assert "<script src" not in html and '<link rel="stylesheet"' not in html
