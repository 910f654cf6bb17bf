"""The browser playground in a real headless Chromium (the system's, driven by Playwright) against
the real app with API keys on: key, upload, mask, previews, final image, download, errors, phone,
the demo-model notice, the before/after comparison, and no 404 while any page loads.

Each state is saved as a screenshot under test-artifacts/playground/.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import shutil
import time
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
    statuses: list[tuple[int, str]] = field(default_factory=list)

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

    def upload_one(self, path: Path) -> None:
        """Choose one image and wait until the layout settled: the mask's copy of it has loaded
        (the form grows as it does, under a pointer about to click)."""
        self.page.set_input_files("#file-input", [str(path)])
        # Polled from here: wait_for_function's string predicate is an eval the page's CSP refuses.
        loaded = "() => document.getElementById('mask-image').naturalWidth > 0"
        deadline = time.monotonic() + 30
        while not self.page.evaluate(loaded):
            assert time.monotonic() < deadline, "the mask's image never loaded"
            self.page.wait_for_timeout(50)

    def submit_and_wait(self, state: str = "done") -> None:
        self.page.click("#submit")
        self.page.wait_for_selector(f"#output[data-state={state}]", timeout=EDIT_TIMEOUT_MS)

    def shot(self, name: str) -> None:
        self.page.evaluate("window.scrollTo(0, 0)")  # the result panel is sticky on wide screens
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def box(self, selector: str) -> dict[str, float]:
        box = self.page.locator(selector).first.bounding_box()
        assert box is not None, selector
        return dict(box)

    def open_timings(self) -> str:
        """The folded timing table's text, after unfolding it as a user would."""
        assert self.page.eval_on_selector("#timings-box", "d => !d.open")  # folded at first
        self.page.click("#timings-box summary")
        return str(self.page.inner_text("#timings"))

    def result_sizes(self) -> list[tuple[int, int, str]]:
        return [
            tuple(s)
            for s in self.page.eval_on_selector_all(
                ".result img.after",
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
    # Every answer the page got: a 404 (a missing favicon, a wrong relative link) is a problem;
    # the 400s and 401s the tests provoke are not.
    page.on("response", lambda r: tab.statuses.append((r.status, r.url)))
    page.add_init_script(_SPY_ON_FORMS)
    page.on("request", lambda r: tab.requests.append(r) if "/v1/images/edits" in r.url else None)
    try:
        yield tab
    finally:
        context.close()
    assert tab.problems == []
    assert [(status, url) for status, url in tab.statuses if status == 404] == []


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
    tab.upload_one(pictures[0])
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
    live = tab.box("#live-image")
    tab.shot("03-preview")
    tab.page.wait_for_selector("#output[data-state=done]", timeout=EDIT_TIMEOUT_MS)
    tab.shot("04-result")
    # The final image is shown at least as large as its live preview was.
    final = tab.box(".result img.after")
    assert final["width"] >= live["width"] - 1, (final, live)
    # Before/after: the input under the result, the result clipped at the slider's place.
    before = tab.page.get_attribute(".result img.before", "src")
    assert before and before == tab.page.get_attribute("#thumbs img", "src")
    tab.page.fill(".result input.split", "20")
    clip = tab.page.eval_on_selector(".result img.after", "i => getComputedStyle(i).clipPath")
    assert clip == "inset(0px 0px 0px 20%)", clip
    stage = tab.box(".result .compare")
    at = tab.page.evaluate(
        "([x, y]) => document.elementFromPoint(x, y).className",
        [stage["x"] + stage["width"] * 0.1, stage["y"] + stage["height"] / 2],
    )
    assert at == "before"  # left of the split, the input shows
    tab.shot("04b-compare")

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
    timings = tab.open_timings()
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
    rows = tab.open_timings()
    for stage in ("server: decode", "server: pipeline", "server: total"):
        assert stage in rows
    links = tab.page.eval_on_selector_all(".result a.button", "as => as.map(a => a.download)")
    assert len(links) == 2 and all(name.endswith(".webp") for name in links)


def test_the_demo_model_is_announced_with_how_to_serve_the_real_one(tab: Tab) -> None:
    tab.open()  # the test app serves the embedded tiny model, as `make run` does
    notice = tab.page.locator("#demo-notice")
    assert notice.is_visible()
    assert "random weights, so every image it makes is noise" in notice.inner_text()
    assert tab.page.inner_text("#model-source") == "tiny"
    # Above the form and the result: the first thing read under the title bar.
    assert tab.box("#demo-notice")["y"] < tab.box("#edit-form")["y"]
    tab.page.click("#demo-notice a")
    tab.page.wait_for_selector("#real-model")
    assert "serve run serve_config.yaml" in tab.page.inner_text("body")


def test_layout_at_desktop_width(tab: Tab) -> None:
    tab.open()
    # The Result card starts level with the form: no empty band above it.
    form, output = tab.box("#edit-form"), tab.box("#output")
    assert abs(output["y"] - form["y"]) <= 2, (form, output)
    # A 16-digit seed fits in its field.
    tab.page.fill("#seed", "1234567890123456")
    fits = tab.page.eval_on_selector("#seed", "e => e.scrollWidth <= e.clientWidth")
    assert fits


def test_form_messages_clear_and_a_non_image_is_refused_visibly(
    tab: Tab, pictures: list[Path], tmp_path: Path
) -> None:
    tab.open()
    tab.enter_key()
    tab.upload_one(pictures[0])
    tab.page.click("#submit")
    assert tab.page.inner_text("#error") == "Write a prompt."
    tab.page.type("#prompt", "m")  # typing clears the stale message
    assert tab.page.is_hidden("#error")
    # A text file dropped on the box: refused, and the page says so.
    dropped = tab.page.evaluate_handle(
        """() => {
          const dt = new DataTransfer();
          dt.items.add(new File(["hello"], "notes.txt", { type: "text/plain" }));
          return dt;
        }"""
    )
    tab.page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    note = tab.page.inner_text("#drop-note")  # beside the box, where it was dropped
    assert note == "notes.txt: not an image. Drop PNG, JPEG or WebP files.", note
    drop, box = tab.box("#drop-note"), tab.box("#dropzone")
    assert 0 <= drop["y"] - (box["y"] + box["height"]) <= 24
    assert len(tab.page.query_selector_all("#thumbs li")) == 1
    tab.shot("09-not-an-image")
    # The next good image clears it.
    tab.page.set_input_files("#file-input", [str(pictures[1])])
    tab.page.wait_for_selector("#thumbs li:nth-child(2)")
    assert tab.page.is_hidden("#drop-note")


def test_a_failed_edit_keeps_the_last_result_beside_its_error(
    tab: Tab, pictures: list[Path]
) -> None:
    tab.open()
    tab.enter_key()
    tab.upload_one(pictures[0])
    tab.set_fields(prompt="make it blue", size="64x64", steps="2", seed="11", partials="0")
    tab.submit_and_wait()
    first = tab.page.get_attribute(".result img.after", "src")
    tab.set_fields(size="13x13")
    tab.submit_and_wait("error")
    # The click scrolled the page to the Edit button; the edit brought the Result card into view,
    # where it lies in the page (level with the form, no band above it), even in a full-page shot.
    top = tab.page.evaluate("document.getElementById('output').getBoundingClientRect().top")
    assert -2 <= top < 900, top
    in_page = "id => document.getElementById(id).getBoundingClientRect().top + window.scrollY"
    output_y, form_y = (tab.page.evaluate(f"({in_page})('{i}')") for i in ("output", "edit-form"))
    assert abs(output_y - form_y) <= 2, (output_y, form_y)
    tab.page.screenshot(path=str(tab.shots / "10-failed-edit-keeps-result.png"), full_page=True)
    assert tab.page.inner_text("#error").startswith("400 (size)")
    assert tab.result_sizes() == [(64, 64, "64x64")]  # the last result is still there
    assert tab.page.get_attribute(".result img.after", "src") == first
    assert "last result is kept" in tab.page.inner_text("#status")
    # The next good edit replaces it.
    tab.set_fields(size="64x64", seed="12")
    tab.submit_and_wait()
    assert tab.page.get_attribute(".result img.after", "src") != first
    assert "seed 12" in tab.page.inner_text(".result figcaption")


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
        assert page.locator("#demo-notice").is_visible()
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
        # The Result card follows the form closely: no empty band between them.
        assert output["y"] - (form["y"] + form["height"]) <= 24, (form, output)
        # A 16-digit seed: it fits in its field, and the result's caption never splits it.
        tab.set_fields(steps="2", partials="1", seed="1234567890123456")
        assert page.eval_on_selector("#seed", "e => e.scrollWidth <= e.clientWidth")
        page.tap("#submit")
        page.wait_for_selector("#output[data-state=done]", timeout=EDIT_TIMEOUT_MS)
        page.locator("#output").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "08-phone-result.png"))
        assert len(tab.result_sizes()) == 1
        assert "seed 1234567890123456" in page.inner_text(".result figcaption")
        lines = page.eval_on_selector_all(
            ".result figcaption .nowrap", "es => es.map(e => e.getClientRects().length)"
        )
        assert lines and set(lines) == {1}, lines
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
