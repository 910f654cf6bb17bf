"""The browser playground in a real headless Chromium (the system's, driven by Playwright) against
the real app with API keys on: key, upload, mask, previews, final image, download, errors, phone.

Each state is saved as a screenshot under test-artifacts/playground/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.integration.clients.conftest import API_KEY, MAX_STEPS, artifacts_dir
from tests.integration.conftest import Server

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")

EDIT_TIMEOUT_MS = 180_000


def find_chromium() -> str | None:
    """The system's Chromium (Debian's `chromium`); CHROMIUM_PATH overrides."""
    candidates = [os.environ.get("CHROMIUM_PATH", "")]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser", "google-chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = find_chromium()
    if executable is None:
        pytest.skip(
            "no Chromium on this machine: install Debian's `chromium` (.ci/run does it as root)"
            " or set CHROMIUM_PATH"
        )
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    return artifacts_dir("playground")


@dataclass
class Tab:
    page: Any
    url: str
    shots: Path
    problems: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(f"{self.url}/")
        self.page.wait_for_selector("body[data-ready=true]")

    def enter_key(self) -> None:
        self.page.fill("#api-key", API_KEY)
        self.page.dispatch_event("#api-key", "change")
        self.page.wait_for_selector("#model option", state="attached")

    def set_fields(self, **fields: str) -> None:
        """Fill the form by element id; a `size` of WxH goes through "custom"."""
        for name, value in fields.items():
            if name == "size" and value not in ("auto", "256x256"):
                self.page.select_option("#size", "custom")
                name = "custom_size"
            selector = "#" + name.replace("_", "-")
            if self.page.eval_on_selector(selector, "e => e.tagName") == "SELECT":
                self.page.select_option(selector, value)
            else:
                self.page.fill(selector, value)

    def submit_and_wait(self, state: str = "done") -> None:
        self.page.click("#submit")
        self.page.wait_for_selector(f"#output[data-state={state}]", timeout=EDIT_TIMEOUT_MS)

    def shot(self, name: str) -> None:
        self.page.evaluate("window.scrollTo(0, 0)")  # the result panel is sticky on wide screens
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def result_sizes(self) -> list[tuple[int, int, str]]:
        return [
            tuple(s)
            for s in self.page.eval_on_selector_all(
                ".result img",
                "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight, i.dataset.size])",
            )
        ]


@contextlib.contextmanager
def open_tab(browser: Any, url: str, shots: Path, **options: Any) -> Iterator[Tab]:
    """A fresh browser context; on leaving, no script error or CSP violation was logged."""
    context = browser.new_context(accept_downloads=True, **options)
    page = context.new_page()
    page.set_default_timeout(30_000)
    tab = Tab(page=page, url=url, shots=shots)
    page.on("pageerror", lambda exc: tab.problems.append(f"page error: {exc}"))

    def on_console(message: Any) -> None:
        # A failed fetch logs "Failed to load resource" (the 401 before a key, the 400s the
        # tests provoke); anything else at error level (a CSP violation, a script error) counts.
        if message.type == "error" and "Failed to load resource" not in message.text:
            tab.problems.append(f"console: {message.text}")

    page.on("console", on_console)
    page.add_init_script(_SPY_ON_FORMS)
    page.on("request", lambda r: tab.requests.append(r) if "/v1/images/edits" in r.url else None)
    try:
        yield tab
    finally:
        context.close()
    assert tab.problems == []


@pytest.fixture
def tab(browser: Any, keyed_server: Server, shots: Path) -> Iterator[Tab]:
    with open_tab(
        browser, keyed_server.url, shots, viewport={"width": 1280, "height": 900}
    ) as opened:
        yield opened


# Records what the page hands to fetch() for the edit route (the multipart body of a request is
# not visible to the driver when it holds files): [{url, entries: [[name, filename, base64]]}].
_SPY_ON_FORMS = """
window.__sentForms = [];
const realFetch = window.fetch;
window.fetch = async function (input, init) {
  if (init && init.body instanceof FormData) {
    const entries = [];
    for (const [name, value] of init.body.entries()) {
      const bytes = value instanceof Blob
        ? new Uint8Array(await value.arrayBuffer()) : new TextEncoder().encode(value);
      let text = "";
      for (const b of bytes) text += String.fromCharCode(b);
      entries.push([name, value instanceof Blob ? value.name || "blob" : null, btoa(text)]);
    }
    window.__sentForms.push({ url: String(input), entries });
  }
  return realFetch.call(this, input, init);
};
"""


def sent_forms(page: Any) -> list[dict[str, list[tuple[str | None, bytes]]]]:
    """name -> [(filename, bytes)] of each form the page sent to the edit route."""
    forms = []
    for form in page.evaluate("window.__sentForms"):
        if form["url"].endswith("v1/images/edits"):
            parts: dict[str, list[tuple[str | None, bytes]]] = {}
            for name, filename, data in form["entries"]:
                parts.setdefault(name, []).append((filename, base64.b64decode(data)))
            forms.append(parts)
    return forms


def _field(parts: dict[str, list[tuple[str | None, bytes]]], name: str) -> str:
    return parts[name][0][1].decode()


def test_the_page_is_public_and_asks_for_the_key(tab: Tab) -> None:
    tab.open()
    assert tab.page.is_visible("#auth-section")
    # Before a key, the page shows the server's own 401 message.
    error = tab.page.inner_text("#error")
    assert "Missing API key" in error and "401" in error
    tab.page.wait_for_selector("#server-status[data-state=ready]")  # /ready is open
    tab.shot("01-key-needed")
    tab.enter_key()
    assert tab.page.is_hidden("#error")
    models = tab.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert models[:2] == ["qwen-image-edit", "qwen-image-edit-2509"]


def test_a_masked_edit_streams_previews_then_the_image_at_its_size(
    tab: Tab, pictures: list[Path], tmp_path: Path
) -> None:
    tab.open()
    tab.enter_key()
    tab.page.set_input_files("#file-input", [str(pictures[0])])
    tab.page.wait_for_selector("#mask-section:not([hidden])")
    box = tab.page.locator("#mask-canvas").bounding_box()
    assert box is not None
    tab.page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.3)
    tab.page.mouse.down()
    tab.page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.65, steps=10)
    tab.page.mouse.up()
    tab.set_fields(prompt="make the sky purple", size="96x64", steps="6", seed="7", partials="2")
    tab.shot("02-form-with-mask")

    tab.page.click("#submit")
    tab.page.wait_for_selector("#previews img", timeout=EDIT_TIMEOUT_MS)
    tab.shot("03-preview")
    tab.page.wait_for_selector("#output[data-state=done]", timeout=EDIT_TIMEOUT_MS)
    tab.shot("04-result")

    # What the page sent: a streamed edit with the painted mask as OpenAI's alpha mask.
    (request,) = tab.requests
    (parts,) = sent_forms(tab.page)
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert _field(parts, "stream") == "true" and _field(parts, "partial_images") == "2"
    assert _field(parts, "size") == "96x64" and _field(parts, "seed") == "7"
    assert _field(parts, "num_inference_steps") == "6"
    mask = Image.open(io.BytesIO(parts["mask"][0][1]))
    assert mask.size == (200, 150)  # the first image's
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    painted = (alpha == 0).mean()
    assert 0.02 < painted < 0.6, painted  # the stroke, not the whole image
    assert alpha[0, 0] == 255 and alpha[-1, -1] == 255  # corners untouched: kept

    # Previews seen, then the final image decoded at the size the response claims.
    assert len(tab.page.query_selector_all("#previews img")) == 2
    assert tab.result_sizes() == [(96, 64, "96x64")]
    caption = tab.page.inner_text(".result figcaption")
    assert "seed 7" in caption
    timings = tab.page.inner_text("#timings")
    assert "first event" in timings and "total (browser)" in timings
    with tab.page.expect_download() as info:
        tab.page.click(".result a.button")
    download = info.value
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    assert saved.suffix == ".png"
    with Image.open(saved) as image:
        assert image.size == (96, 64)


def test_two_images_n2_without_previews_show_the_server_timing(
    tab: Tab, pictures: list[Path]
) -> None:
    tab.open()
    tab.enter_key()
    tab.page.set_input_files("#file-input", [str(p) for p in pictures])
    tab.page.wait_for_selector("#thumbs li:nth-child(2)")
    assert tab.page.is_hidden("#mask-section")  # a mask applies to single-image edits
    tab.set_fields(
        prompt="put the two", size="64x64", steps="2", n="2", partials="0", format="webp"
    )
    tab.submit_and_wait()
    tab.shot("05-two-images-n2")

    assert len(tab.requests) == 1  # one ordinary request for both images
    (parts,) = sent_forms(tab.page)
    assert [name for name, _ in parts["image[]"]] == ["picture1.png", "picture2.png"]
    assert _field(parts, "n") == "2" and "stream" not in parts
    assert tab.result_sizes() == [(64, 64, "64x64")] * 2
    # No seed was sent: each card shows the seed the server reports for it (seed, seed + 1).
    captions = tab.page.eval_on_selector_all(".result .seed", "es => es.map(e => e.textContent)")
    seeds = [int(m.group(1)) for c in captions if (m := re.search(r"seed (\d+)", c))]
    assert len(seeds) == 2 and seeds[1] == seeds[0] + 1, captions
    rows = tab.page.inner_text("#timings")
    for stage in ("server: decode", "server: pipeline", "server: total"):
        assert stage in rows
    links = tab.page.eval_on_selector_all(".result a.button", "as => as.map(a => a.download)")
    assert len(links) == 2 and all(name.endswith(".webp") for name in links)


def test_a_bad_size_shows_the_servers_400_message(tab: Tab, pictures: list[Path]) -> None:
    tab.open()
    tab.enter_key()
    tab.page.set_input_files("#file-input", [str(pictures[0])])
    tab.set_fields(prompt="anything", size="13x13")
    tab.submit_and_wait("error")
    tab.shot("06-bad-size")
    error = tab.page.inner_text("#error")
    # The server's OpenAI error, as it sent it: status, param and message.
    assert error.startswith("400 (size): size 13x13 is out of range"), error
    assert "between 32 and 256" in error
    assert tab.page.is_enabled("#submit")  # ready for the next try


def test_stop_cancels_the_edit_and_the_next_one_works(tab: Tab, pictures: list[Path]) -> None:
    tab.open()
    tab.enter_key()
    tab.page.set_input_files("#file-input", [str(pictures[0])])
    # The first of 3 previews comes after a quarter of the steps: the other 300 (~15-60 s of CPU)
    # leave Stop enabled for the click, however fast the machine (8 steps could finish first).
    tab.set_fields(prompt="slowly", size="64x64", steps=str(MAX_STEPS), partials="3")
    tab.page.click("#submit")
    tab.page.wait_for_selector("#previews img", timeout=EDIT_TIMEOUT_MS)
    tab.page.click("#stop")
    tab.page.wait_for_selector("#output[data-state=stopped]")
    assert tab.result_sizes() == [] and tab.page.is_hidden("#error")
    # The server let go of the stopped edit: the next one is answered.
    tab.set_fields(steps="2", partials="1")
    tab.submit_and_wait()
    assert tab.result_sizes() == [(64, 64, "64x64")]


def test_phone_width(browser: Any, keyed_server: Server, shots: Path, pictures: list[Path]) -> None:
    phone = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2}
    with open_tab(browser, keyed_server.url, shots, is_mobile=True, has_touch=True, **phone) as tab:
        page = tab.page
        tab.open()
        tab.enter_key()
        page.set_input_files("#file-input", [str(pictures[0])])
        page.wait_for_selector("#mask-section:not([hidden])")
        page.fill("#prompt", "make the sky purple")
        tab.shot("07-phone-form")
        # Nothing wider than the screen: no sideways scrolling.
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        for selector in ("#dropzone", "#mask-canvas", "#prompt", "#submit"):
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        # The result panel comes below the form on a phone.
        form = page.locator("#edit-form").bounding_box()
        output = page.locator("#output").bounding_box()
        assert form is not None and output is not None and output["y"] > form["y"] + 100
        tab.set_fields(steps="2", partials="1")
        page.tap("#submit")
        page.wait_for_selector("#output[data-state=done]", timeout=EDIT_TIMEOUT_MS)
        page.locator("#output").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "08-phone-result.png"))
        assert len(tab.result_sizes()) == 1
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
