"""A real headless Chromium on the real app: upload a photo, age it, blend ages, bad uploads;
and the README's demo (`python app/app.py` on the shipped model) from upload to aged faces.

Needs Debian's `chromium` (CI's .ci/run installs it) and fails without it; set
AGECGAN_SKIP_BROWSER=1 to skip these tests instead. Playwright drives that Chromium as it is:
no browser is downloaded, and the page may fetch nothing from outside 127.0.0.1.
"""

import io
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from helpers import TINY, free_port, load_app, serving, vivid_generator
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from agecgan import BUCKET_LABELS, AgingPipeline, Encoder
from agecgan.checkpoints import export_model

if os.environ.get("AGECGAN_SKIP_BROWSER") == "1":
    pytest.skip("AGECGAN_SKIP_BROWSER=1: real-browser tests skipped", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "app" / "examples" / "grace_hopper.jpg"  # public domain
PHOTO_SIZE = (512, 600)
SCREENSHOT = ROOT / "test-artifacts" / "browser" / "aged.png"  # kept for people and CI to look at
WAIT_MS = 60_000  # each step takes a second or two here; CI's 2 slow cores may take far longer
FACE_SIDE = 256  # the app's OUTPUT_SIZE
FACES = "Reconstruction, then ages 0-18 to 60+"  # the labels on the page, as app.py sets them
AGE_BOX = "Age of the person in the photo (years)"
# Gradio 6.31's queue statistics use pandas options that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")


webapp = load_app("agecgan_app_browser")  # a copy of its own


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, aligner, uploads):  # aligner: the shared MTCNN, one thread
    """The app's real server on a free loopback port, with a tiny random model."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    export_model(folder, TINY, encoder=Encoder(TINY), generator=vivid_generator())
    demo = webapp.build_demo(AgingPipeline.from_pretrained(folder, device="cpu"))
    with serving(webapp, demo) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed: `apt-get install chromium` (CI's .ci/run does), "
            "or set AGECGAN_SKIP_BROWSER=1 to skip the real-browser tests.",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        # Containers give /dev/shm a few MB; Chromium's renderer then crashes on large pages.
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=["--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page that may reach only 127.0.0.1; no uncaught script error may happen on it."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    outside, errors = [], []

    def loopback_only(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    context.close()
    assert not outside, f"the page tried to reach other hosts: {outside}"
    assert not errors, f"uncaught errors in the page: {errors}"


def panel(page, label: str):
    """The Gradio block whose visible label is exactly `label`."""
    title = page.get_by_test_id("block-label").filter(
        has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")
    )
    return page.locator(".block").filter(has=title)


def open_app(page, url: str):
    """Load the page; returns its Age button, once the app is ready to take a click."""
    page.goto(url)
    age = page.get_by_role("button", name="Age", exact=True)
    expect(age).to_be_enabled(timeout=WAIT_MS)
    return age


def upload(page, path: Path) -> None:
    """Pick a file in the photo widget's file chooser, as a user clicking it does."""
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Drop an image file here to upload").click()
    chooser.value.set_files(path)


def upload_photo(page, path: Path) -> None:
    """Upload, and wait until the server has the file: the widget then shows it from there."""
    upload(page, path)
    preview = panel(page, "Photo").locator("img")
    expect(preview).to_have_attribute("src", re.compile("/gradio_api/file="), timeout=WAIT_MS)


def loaded(images) -> list[tuple[str, int, int]]:
    """(alt, natural width, natural height) of each <img>, once shown and decoded; a broken
    image fails. Gradio's galleries load lazily: each is scrolled into view first."""
    sizes = images.evaluate_all(
        """async (images, ms) => {
            const sizes = [];
            for (const image of images) {
                image.scrollIntoView({block: "center"});
                const late = new Promise((_, fail) => setTimeout(
                    () => fail(new Error(`${image.src} not loaded after ${ms} ms`)), ms));
                await Promise.race([image.decode(), late]);
                sizes.push([image.alt, image.naturalWidth, image.naturalHeight]);
            }
            return sizes;
        }""",
        WAIT_MS,
    )
    return [tuple(size) for size in sizes]


def pixels(page, image) -> np.ndarray:
    """The pixels the page shows in an <img>, fetched again from its src."""
    response = page.request.get(image.get_attribute("src"))
    assert response.ok, response.status
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Visibly different images (here: 10-25 levels apart on average), not rounding noise."""
    return np.abs(a.astype(int) - b.astype(int)).mean() > 2


def toast(page, message: str):
    """Gradio's notification box holding `message`."""
    return page.get_by_test_id("toast-body").filter(has_text=message)


def test_age_a_photo_then_blend_ages(page, app_url):
    age = open_app(page, app_url)
    upload_photo(page, PHOTO)
    page.get_by_label(AGE_BOX).fill("77")
    age.click()  # with the page's defaults: identity preserved, 20 steps

    faces = panel(page, FACES).locator("img")
    expect(faces).to_have_count(7, timeout=WAIT_MS)
    captions = ["reconstruction (60+)", *BUCKET_LABELS]
    assert loaded(faces) == [(caption, FACE_SIDE, FACE_SIDE) for caption in captions]
    pasted = panel(page, "In the photo").locator("img")
    expect(pasted).to_have_count(6, timeout=WAIT_MS)
    assert loaded(pasted) == [(label, *PHOTO_SIZE) for label in BUCKET_LABELS]
    gif = panel(page, "Progression, youngest to oldest (GIF)").locator("img")
    expect(gif).to_have_attribute("src", re.compile(r"progression\.gif$"), timeout=WAIT_MS)
    assert loaded(gif) == [("", FACE_SIDE, FACE_SIDE)]

    # After aging, the blend shows the sliders' start (between 30-39 and 40-49).
    blended = panel(page, "Blended face").locator("img")
    expect(blended).to_have_attribute("src", re.compile(r"blend\.png$"), timeout=WAIT_MS)
    start_src, start = blended.get_attribute("src"), pixels(page, blended)

    # Sweep the continuous age to its end, 60+, with the keyboard: the blend becomes the
    # 60+ face, and the bucket sliders follow.
    sweep = page.get_by_role("slider", name="range slider for Age, young to old")
    sweep.press("End")
    expect(blended).not_to_have_attribute("src", start_src, timeout=WAIT_MS)
    oldest_src, oldest = blended.get_attribute("src"), pixels(page, blended)
    assert differ(oldest, start)
    np.testing.assert_array_equal(oldest, pixels(page, faces.nth(6)))
    for label, value in zip(BUCKET_LABELS, "000001", strict=True):
        weight = page.get_by_role("spinbutton", name=f"number input for Weight of {label}")
        expect(weight).to_have_value(value, timeout=WAIT_MS)

    # One bucket slider: 0-18 up to 1 too, an even mix of the youngest and the oldest face.
    youngest = page.get_by_role("slider", name="range slider for Weight of 0-18")
    youngest.press("End")
    expect(blended).not_to_have_attribute("src", oldest_src, timeout=WAIT_MS)
    mixed = pixels(page, blended)
    assert differ(mixed, oldest) and differ(mixed, start)
    assert loaded(blended) == [("", FACE_SIDE, FACE_SIDE)]

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    assert SCREENSHOT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(SCREENSHOT) as shot:
        shot.load()
        assert shot.width == 1280 and shot.height >= 900, shot.size
        assert np.asarray(shot.convert("L")).std() > 10  # a page, not a blank sheet


def test_a_file_of_another_type_is_refused_by_the_page(page, app_url, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image\n")
    age = open_app(page, app_url)
    upload(page, tmp_path / "notes.txt")
    refused = toast(page, "Invalid file type: notes.txt. Only image/* allowed.")
    expect(refused).to_be_visible(timeout=WAIT_MS)
    age.click()
    message = "Upload a photo, take one with the webcam, or pick an example first."
    expect(toast(page, message)).to_be_visible(timeout=WAIT_MS)
    assert "Traceback" not in page.locator("body").inner_text()


def test_a_file_named_like_a_photo_that_is_none_gets_the_apps_message(
    page, app_url, uploads, tmp_path
):
    (tmp_path / "notes.png").write_text("not an image\n")
    age = open_app(page, app_url)
    upload_photo(page, tmp_path / "notes.png")
    page.get_by_label(AGE_BOX).fill("")  # no age given: 19-29 is assumed
    age.click()
    message = "This file could not be read as a photo: cannot read notes.png: cannot identify"
    expect(toast(page, message)).to_be_visible(timeout=WAIT_MS)
    expect(toast(page, message)).to_contain_text("Error")
    text = page.locator("body").inner_text()
    assert "Traceback" not in text and str(uploads) not in text  # the server's paths stay private
    expect(panel(page, FACES).locator("img")).to_have_count(0)


def test_age_a_photo_without_touching_the_age_box(page, app_url):
    age = open_app(page, app_url)
    upload_photo(page, PHOTO)
    age.click()
    faces = panel(page, FACES).locator("img")
    # Whichever comes first: the faces, or a message.
    expect(faces.first.or_(page.get_by_test_id("toast-body"))).to_be_visible(timeout=WAIT_MS)
    messages = page.get_by_test_id("toast-body").all_inner_texts()
    assert not messages, messages
    expect(faces).to_have_count(7, timeout=WAIT_MS)


def test_detail_drawing_strength_and_adaptation_from_the_page(page, app_url):
    """The drawing controls reach the aging: detail at strength 0 gives back the photo's own
    face at every age, and the sliders then draw the same way."""
    age = open_app(page, app_url)
    upload_photo(page, PHOTO)
    page.get_by_label(AGE_BOX).fill("77")
    page.get_by_label("Preserve identity").uncheck()
    page.get_by_label("detail").check()
    strength = page.get_by_role("spinbutton", name="number input for Strength of the age change")
    strength.fill("0")
    strength.press("Enter")
    adapt = page.get_by_role("spinbutton", name="number input for Adaptation steps")
    adapt.fill("2")
    adapt.press("Enter")
    age.click()
    faces = panel(page, FACES).locator("img")
    expect(faces).to_have_count(7, timeout=WAIT_MS)
    expect(faces.nth(6)).to_have_attribute("src", re.compile(r"60_plus\.png$"), timeout=WAIT_MS)
    youngest, oldest = pixels(page, faces.nth(1)), pixels(page, faces.nth(6))
    assert not differ(youngest, oldest)  # strength 0: no change at any age
    blended = panel(page, "Blended face").locator("img")
    expect(blended).to_have_attribute("src", re.compile(r"blend\.png$"), timeout=WAIT_MS)
    assert not differ(pixels(page, blended), oldest)

    strength.fill("2")  # a strong change: the ages now differ
    strength.press("Enter")
    first = faces.nth(6).get_attribute("src")
    age.click()
    expect(faces.nth(6)).not_to_have_attribute("src", first, timeout=WAIT_MS)
    expect(faces).to_have_count(7, timeout=WAIT_MS)
    assert differ(pixels(page, faces.nth(1)), pixels(page, faces.nth(6)))


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """What `make demo` runs: `python app/app.py` as its own process, on the shipped model."""
    port = free_port()
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("AGECGAN_MODEL", None)
    log = tmp_path_factory.mktemp("demo") / "app.log"
    with open(log, "w") as output:
        process = subprocess.Popen(
            [sys.executable, "app/app.py", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the demo did not start: {log.read_text()}")
                time.sleep(1.0)
        yield url
    finally:
        process.terminate()
        process.wait(30)
    assert "Traceback" not in log.read_text()


def test_the_demo_ages_a_photo_with_the_shipped_model(page, demo_url):
    """The README's demo on the trained checkpoint: a photo in, seven faces and the
    progression out, with the page's defaults (identity optimization on, age not given)."""
    age = open_app(page, demo_url)
    expect(page.get_by_text("The shipped model is missing")).to_have_count(0)
    upload_photo(page, PHOTO)
    age.click()
    faces = panel(page, FACES).locator("img")
    expect(faces).to_have_count(7, timeout=WAIT_MS)
    # No age typed: the shipped estimator reads Grace Hopper (77 here) as about 80.
    captions = ["reconstruction (60+)", *BUCKET_LABELS]
    assert loaded(faces) == [(caption, FACE_SIDE, FACE_SIDE) for caption in captions]
    expect(page.get_by_text("input age not given: estimated from the photo")).to_be_visible()
    gif = panel(page, "Progression, youngest to oldest (GIF)").locator("img")
    expect(gif).to_have_attribute("src", re.compile(r"progression\.gif$"), timeout=WAIT_MS)
    youngest, oldest = pixels(page, faces.nth(1)), pixels(page, faces.nth(6))
    assert differ(youngest, oldest)  # the trained G draws the ages differently
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOT.with_name("demo.png"), full_page=True)
    assert SCREENSHOT.with_name("demo.png").stat().st_size > 50_000
