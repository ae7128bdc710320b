"""The Streamlit page on a tiny model, through Streamlit's own script runner (AppTest): examples,
uploads and the webcam, blend sliders, broken photos, no model; and `streamlit run` serving."""

import io
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from helpers import TINY, estimated_bucket, free_port, streamlit_answers, vivid_generator
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

import agecgan.pipeline  # noqa: E402
from agecgan import BUCKET_LABELS, AgingPipeline, Encoder  # noqa: E402
from agecgan.checkpoints import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "app" / "streamlit_app.py"
FRAMES = 2 * 24 - 2  # the GIF: 24 frames forth, then back without repeating the ends
CAPTIONS = ["input (aligned)", "reconstruction ({})", *BUCKET_LABELS]


@pytest.fixture(scope="module")
def model(tmp_path_factory, aligner):  # aligner: the shared MTCNN, on one thread
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    export_model(folder, TINY, encoder=Encoder(TINY), generator=vivid_generator())
    return folder


@pytest.fixture
def page(monkeypatch, model):
    """The page with the tiny model ($AGECGAN_MODEL), rendered once; nothing chosen yet."""
    monkeypatch.setenv("AGECGAN_MODEL", str(model))
    return run(AppTest.from_file(str(PAGE), default_timeout=60))


def run(target) -> AppTest:
    """A rerun of the page (or of a widget's page, after setting it), as after a user's action;
    the page never shows a traceback."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def images(at: AppTest) -> list[tuple[str, str]]:
    """(caption, media URL) of every image on the page, in order; the URL hashes the bytes."""
    return [(image.captions[0], image.value[0]) for image in at.image]


def faces(at: AppTest) -> dict[str, str]:
    """The first row: caption -> URL of the aligned input, the reconstruction, the six ages."""
    return dict(images(at)[:8])


def upload(at: AppTest, name: str, data: bytes) -> AppTest:
    """Send a file through the uploader, identity optimization off (it needs FR: slower)."""
    at.toggle[0].set_value(False)
    return run(at.file_uploader(key="upload").upload(name, data, "application/octet-stream"))


def photo_bytes(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def test_without_a_model_the_page_says_so(tmp_path, monkeypatch, model):
    monkeypatch.setattr(agecgan.pipeline, "DEFAULT_MODEL", tmp_path)  # no model files
    monkeypatch.delenv("AGECGAN_MODEL", raising=False)
    at = run(AppTest.from_file(str(PAGE), default_timeout=60))
    assert at.title[0].value == "Age-cGAN: one face at every age"
    [message] = [error.value for error in at.error]
    assert message.startswith("The shipped model is missing from checkpoints/")
    assert "--model DIR" in message and "AGECGAN_MODEL" in message
    assert not at.file_uploader  # nothing to age with: the page stops at the message
    assert "streamlit run app/streamlit_app.py -- --model DIR" in at.caption[0].value
    monkeypatch.setenv("AGECGAN_MODEL", str(tmp_path / "nowhere"))
    at = run(AppTest.from_file(str(PAGE), default_timeout=60))
    assert "nowhere is not a model folder" in at.error[0].value
    damaged = tmp_path / "damaged"  # a model folder whose weights are not safetensors
    shutil.copytree(model, damaged)
    (damaged / "encoder.safetensors").write_bytes(b"not weights")
    monkeypatch.setenv("AGECGAN_MODEL", str(damaged))
    at = run(AppTest.from_file(str(PAGE), default_timeout=60))
    assert at.error[0].value.startswith(f"The model in {damaged} could not be loaded: ")


def test_model_from_the_command_line(tmp_path, monkeypatch, model):
    monkeypatch.setattr(agecgan.pipeline, "DEFAULT_MODEL", tmp_path)
    monkeypatch.delenv("AGECGAN_MODEL", raising=False)
    # `streamlit run app/streamlit_app.py -- --model DIR` leaves exactly this in sys.argv.
    monkeypatch.setattr(sys, "argv", [str(PAGE), "--model", str(model)])
    at = run(AppTest.from_file(str(PAGE), default_timeout=60))
    assert not at.error and len(at.file_uploader) == 1
    assert at.info[0].value.startswith("Upload a photo, take one with the webcam")


def test_example_ages_and_sliders_blend_without_aging_again(tmp_path, page, model):
    at = run(page.radio(key="source").set_value("Example"))
    at = run(at.selectbox(key="example").select("Grace Hopper"))
    assert at.number_input(key="input_age").value == 77  # the example brings its age
    shown = faces(at)
    assert list(shown) == [CAPTIONS[0], CAPTIONS[1].format("60+"), *BUCKET_LABELS]
    # Drawn in detail (the default): the reconstruction at her own bucket, 60+, and the 60+
    # face are her aligned face itself; the five other ages differ from it and each other.
    assert shown[CAPTIONS[0]] == shown[CAPTIONS[1].format("60+")] == shown["60+"]
    assert len(set(shown.values())) == 6
    pasted = dict(images(at)[-6:])  # "Every age in the photo"
    assert sorted(pasted) == sorted(BUCKET_LABELS) and len(set(pasted.values())) == 6
    [bar] = at.get("progress")  # identity optimization and adaptation on, the default steps
    assert bar.value == 100, bar.text
    done = r"\(20 identity steps, loss [\d.]+; 20 adaptation steps, loss [\d.]+\)$"
    assert re.search(done, bar.text), bar.text
    assert at.download_button[0].label == "Download the progression (GIF)"
    aged = at.session_state["aged"]
    with Image.open(io.BytesIO(aged.gif)) as gif:
        assert gif.n_frames == FRAMES and gif.size == (256, 256)
    # The same animation as pipeline.save_gif writes to a file.
    pipeline = AgingPipeline.from_pretrained(model, device="cpu")
    frames = pipeline.progression(aged.result, frames=24)
    assert agecgan.pipeline.save_gif(frames, tmp_path / "x.gif").read_bytes() == aged.gif

    # One continuous age: 5 = 60+ sets the six weights; the blend is the 60+ face exactly.
    at = run(at.slider(key="position").set_value(5.0))
    assert [at.slider(key=f"weight_{b}").value for b in range(6)] == [0, 0, 0, 0, 0, 1]
    blended = dict(images(at)[8:10])
    assert blended == {"Blended face": shown["60+"], "Blended, in the photo": pasted["60+"]}
    assert at.session_state["aged"] is aged and not at.get("progress")  # not aged again
    # The bucket sliders weight the condition: a mix is none of the six faces.
    at.slider(key="weight_5").set_value(0.0)
    at.slider(key="weight_2").set_value(0.75)
    at = run(at.slider(key="weight_3").set_value(0.25))
    mixed = images(at)[8]
    assert mixed[0] == "Blended face" and mixed[1] not in shown.values()
    at = run(at.slider(key="position").set_value(2.25))  # the same mix from the age slider
    assert images(at)[8] == mixed
    at.slider(key="weight_2").set_value(0.0)
    at = run(at.slider(key="weight_3").set_value(0.0))
    assert at.warning[0].value == "Set at least one age slider above 0."
    assert "Blended face" not in dict(images(at))


def test_uploads_and_the_webcam_age_photos(page, astronaut, grace_hopper):
    at = upload(page, "me.png", photo_bytes(Image.fromarray(astronaut)))
    label = estimated_bucket(info.value for info in at.info)  # no age typed: estimated
    assert list(faces(at)) == [CAPTIONS[0], CAPTIONS[1].format(label), *BUCKET_LABELS]
    assert at.get("progress")[0].text.startswith("Aged in")
    at = run(at.number_input(key="input_age").set_value(45))  # new options: aged again
    assert "reconstruction (40-49)" in faces(at)
    before = faces(at)["60+"]
    at = run(at.radio(key="render").set_value("detail"))  # the drawing options age again
    at = run(at.slider(key="strength").set_value(2.0))
    assert faces(at)["60+"] != before and "reconstruction (40-49)" in faces(at)
    at = run(at.radio(key="source").set_value("Webcam"))
    assert not at.image  # no photo taken yet
    at = run(at.camera_input(key="camera").upload("shot.jpg", grace_hopper.read_bytes()))
    assert list(faces(at)) == [CAPTIONS[0], CAPTIONS[1].format("40-49"), *BUCKET_LABELS]


def awkward(kind: str, astronaut) -> bytes:
    """A photo that works once the page has turned, shrunk or flattened it."""
    image, buffer = Image.fromarray(astronaut), io.BytesIO()
    if kind == "huge":
        image.resize((3000, 3000), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    elif kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": undoes the turn below
        image.transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", exif=exif, quality=95)
    elif kind == "gif":
        image.save(buffer, "GIF", save_all=True, append_images=[Image.new("RGB", image.size)])
    return buffer.getvalue()


AWKWARD = {  # the note the page shows, read from bytes in memory as read_photo reads a file
    "huge": "large photo: shrunk from 3000x3000 to 2048x2048 px",
    "exif-rotated": "turned upright by its EXIF orientation",
    "gif": "animated image: the first of 2 frames was used",
}


@pytest.mark.parametrize("kind", AWKWARD)
def test_awkward_photos_work_and_say_what_changed(page, astronaut, kind):
    name = {"huge": "huge.jpg", "exif-rotated": "exif.jpg", "gif": "animated.gif"}[kind]
    at = upload(page, name, awkward(kind, astronaut))
    assert AWKWARD[kind] in [info.value for info in at.info]
    assert list(faces(at))[2:] == list(BUCKET_LABELS)
    result = at.session_state["aged"].result
    assert result.photo.size == ((2048, 2048) if kind == "huge" else (512, 512))
    if kind == "exif-rotated":  # upright: the face where it is in the astronaut photo
        assert result.box[1] < 256 and 128 < result.box[0] < 384, result.box


def two_faces(astronaut, grace_hopper) -> bytes:
    canvas = Image.new("RGB", (1112, 600), (128, 128, 128))
    canvas.paste(Image.fromarray(astronaut), (0, 0))
    canvas.paste(Image.open(grace_hopper).convert("RGB"), (512, 0))
    return photo_bytes(canvas)


def bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 100,000 x 100,000 pixels."""
    data = bytearray(photo_bytes(Image.new("RGB", (1, 1))))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


BROKEN = {  # what the user sends -> the message they see (the Gradio app's messages)
    "text": "This file could not be read as a photo: cannot read photo.png: cannot identify "
    "image file 'photo.png'",
    "truncated": "This file could not be read as a photo: cannot read photo.png: image file is "
    "truncated",
    "bomb": "cannot read photo.png: Image size (10000000000 pixels) exceeds limit of",
    "over the cap": "cannot read photo.png: 512x600 is more than the 307,199 pixels allowed",
    "too large": "photo.png is larger than the 25 MB allowed for a photo.",
    "tiny": "No face found: the image (10x10 px) is smaller than the smallest detectable face",
    "no face": "No face found in the image. Try a photo where the face is larger, frontal and "
    "well lit.",
}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_photos_show_clear_messages(monkeypatch, page, grace_hopper, kind):
    data = {
        "text": b"not an image\n",
        "truncated": grace_hopper.read_bytes()[:20_000],
        "bomb": bomb(),
        "over the cap": grace_hopper.read_bytes(),
        "too large": b"\0" * (25 * 2**20 + 1),
        "tiny": photo_bytes(Image.new("RGB", (10, 10), "white")),
        "no face": photo_bytes(Image.new("RGB", (300, 300), (128, 128, 128))),
    }[kind]
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512)
    if kind == "over the cap":  # over the cap, under twice it: PIL itself only warns
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 600 - 1)
    at = upload(page, "photo.png", data)
    [error] = at.error
    assert BROKEN[kind] in error.value, error.value
    assert not at.image and not at.get("progress") and "aged" not in at.session_state


def test_several_faces_age_the_largest_and_say_so(page, astronaut, grace_hopper):
    at = upload(page, "two.png", two_faces(astronaut, grace_hopper))
    [warning] = at.warning
    assert warning.value.startswith("2 faces found; the largest (box ")
    assert warning.value.endswith(") was used")
    assert at.session_state["aged"].result.box[0] > 512  # Grace Hopper's, on the right
    assert list(faces(at))[2:] == list(BUCKET_LABELS)


def test_streamlit_run_serves_the_page(tmp_path, model):
    port = free_port()
    command = [
        *(sys.executable, "-m", "streamlit", "run", str(PAGE)),
        *("--server.headless", "true", "--server.address", "127.0.0.1"),
        *("--server.port", str(port), "--browser.gatherUsageStats", "false"),
        *("--", "--model", str(model)),
    ]
    log = tmp_path / "streamlit.log"
    env = {**os.environ, "HOME": str(tmp_path)}  # no ~/.streamlit of the user's
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)
    try:
        answers = streamlit_answers(server, port)
        assert set(answers) == {"/", "/_stcore/health"}, log.read_text()
        assert answers["/"][0] == 200 and b"<html" in answers["/"][1].lower()
        assert answers["/_stcore/health"] == (200, b"ok")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_the_page_and_its_server_share_the_apps_upload_limit():
    """Streamlit's server refuses large uploads by its config file, which cannot import the
    limit: it must say the same as agecgan.service, which the page and the Gradio app use."""
    import tomllib

    from agecgan import service

    for config in (ROOT / ".streamlit" / "config.toml", ROOT / "app" / "streamlit_space.toml"):
        settings = tomllib.loads(config.read_text())
        assert settings["server"]["maxUploadSize"] == service.MAX_UPLOAD_MB, config
