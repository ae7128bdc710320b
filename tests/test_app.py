"""The Gradio app on a tiny model: handlers on good and broken photos, API under load, no model."""

import hashlib
import http.server
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
import torch
from gradio.utils import get_upload_folder
from helpers import TINY, estimated_bucket, free_port, load_app, serving, vivid_generator
from PIL import Image

import agecgan.pipeline
import agecgan.service
from agecgan import BUCKET_LABELS, AgingPipeline, Encoder
from agecgan.adapt import DEFAULT_ADAPT_STEPS
from agecgan.checkpoints import export_model

ROOT = Path(__file__).resolve().parents[1]
# Gradio 6.31's queue statistics use pandas options that pandas 3 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:::gradio.queueing")
FRAMES = 2 * 24 - 2  # the GIF: 24 frames forth, then back without repeating the ends


webapp = load_app()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, aligner, uploads):  # aligner: the shared MTCNN, one thread
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    export_model(folder, TINY, encoder=Encoder(TINY), generator=vivid_generator())
    return AgingPipeline.from_pretrained(folder, device="cpu")


def age(pipeline, photo, input_age=None, **options):
    """age_photo without identity optimization unless asked (it needs FR: slower)."""
    options = {"identity": False, "steps": 0, **options}
    return webapp.age_photo(pipeline, photo, input_age, options["identity"], options["steps"])


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def check_outputs(outputs, size):
    faces, pasted, gif, notes, session = outputs
    assert len(faces) == 7 and len(pasted) == 6
    assert faces[0][1].startswith("reconstruction (")
    assert [caption for _, caption in faces[1:]] == [caption for _, caption in pasted]
    assert [caption for _, caption in pasted] == list(BUCKET_LABELS)
    assert all(pixels(face).shape == (256, 256, 3) for face, _ in faces)
    assert all(pixels(photo).shape == (size[1], size[0], 3) for photo, _ in pasted)
    folders = {Path(path).parent for path, _ in faces + pasted} | {Path(gif).parent}
    assert len(folders) == 1 and folders.pop().parent == Path(get_upload_folder())
    with Image.open(gif) as animation:
        assert animation.n_frames == FRAMES and animation.size == (256, 256)
    assert isinstance(notes, str) and isinstance(session, webapp.Session)


def write_photo(kind, astronaut, grace_hopper, folder: Path):
    """One awkward or broken photo file: its path and the size the app should use."""
    image = Image.fromarray(astronaut)
    path = folder / f"{kind}.png"
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "truncated":
        path = folder / "truncated.jpg"
        path.write_bytes(grace_hopper.read_bytes()[:20_000])
    elif kind == "bomb":  # a valid 1x1 PNG whose header claims 100,000 x 100,000 pixels
        Image.new("RGB", (1, 1)).save(path)
        data = bytearray(path.read_bytes())
        data[16:24] = struct.pack(">II", 100_000, 100_000)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
        path.write_bytes(bytes(data))
    elif kind == "tiny":
        Image.new("RGB", (10, 10), "white").save(path)
    elif kind == "no face":
        Image.new("RGB", (300, 300), (128, 128, 128)).save(path)
    elif kind == "grayscale":
        image.convert("L").save(path)
    elif kind == "rgba":
        image.putalpha(200)
        image.save(path)
    elif kind == "cmyk":
        path = folder / "cmyk.jpg"
        image.convert("CMYK").save(path, quality=95)
    elif kind == "16-bit":
        cv2.imwrite(str(path), astronaut[..., ::-1].astype(np.uint16) * 257)
    elif kind == "exif-rotated":
        path = folder / "exif.jpg"
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": undoes the turn below
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)
    elif kind == "gif":
        path = folder / "animated.gif"
        image.save(path, save_all=True, append_images=[Image.new("RGB", image.size)])
    elif kind == "huge":
        image.resize((3000, 3000), Image.Resampling.BICUBIC).save(path)
    elif kind == "two faces":
        canvas = Image.new("RGB", (1112, 600), (128, 128, 128))
        canvas.paste(image, (0, 0))
        canvas.paste(Image.open(grace_hopper).convert("RGB"), (512, 0))
        canvas.save(path)
    return path


@pytest.mark.parametrize("name", ["eileen_collins.jpg", "grace_hopper.jpg", "cameraman.jpg"])
def test_bundled_examples_age(pipeline, name):
    path = ROOT / "app" / "examples" / name
    outputs = age(pipeline, path, input_age=77)
    check_outputs(outputs, Image.open(path).size)
    assert outputs[0][0][1] == "reconstruction (60+)"
    assert path.is_file()  # examples are ours: never deleted like an upload


@pytest.mark.parametrize("untouched", [None, 0])  # the page's number box starts at 0
def test_an_age_left_empty_is_estimated(pipeline, grace_hopper, untouched):
    outputs = age(pipeline, grace_hopper, input_age=untouched)
    label = estimated_bucket(line.removeprefix("- ") for line in outputs[3].splitlines())
    assert label == "60+"  # Grace Hopper, 77 in this photo, reads as about 80
    assert outputs[0][0][1] == f"reconstruction ({label})"


def test_identity_optimization_reports_progress(pipeline, grace_hopper):
    calls = []
    outputs = webapp.age_photo(
        pipeline, grace_hopper, 77, True, 2, progress=lambda *a, **k: calls.append((a, k))
    )
    check_outputs(outputs, (512, 600))
    steps = [a[0] for a, _ in calls if isinstance(a[0], tuple)]
    adapting = [(step, DEFAULT_ADAPT_STEPS) for step in range(1, DEFAULT_ADAPT_STEPS + 1)]
    assert steps == [(1, 2), (2, 2), *adapting]  # the identity steps, then the adaptation's
    assert any("fitting the face" in k.get("desc", "") for _, k in calls)


AWKWARD = {  # kind: a note the app must show (or None), and the size it works at
    "grayscale": ("grayscale photo: the faces are shown in grayscale too", (512, 512)),
    "rgba": (None, (512, 512)),
    "cmyk": (None, (512, 512)),
    "16-bit": (None, (512, 512)),
    "exif-rotated": ("turned upright by its EXIF orientation", (512, 512)),
    "gif": ("animated image: the first of 2 frames was used", (512, 512)),
    "huge": ("large photo: shrunk from 3000x3000 to 2048x2048 px", (2048, 2048)),
    "two faces": ("2 faces found; the largest (box", (1112, 600)),
}


@pytest.fixture(scope="module")
def astronaut_box(pipeline, astronaut):
    return np.array(pipeline(astronaut, optimize_identity=False).box)


@pytest.mark.parametrize("kind", AWKWARD)
def test_awkward_photos_work_and_say_what_changed(
    tmp_path, pipeline, astronaut, grace_hopper, astronaut_box, kind
):
    path = write_photo(kind, astronaut, grace_hopper, tmp_path)
    outputs = age(pipeline, path, input_age=40)
    note, size = AWKWARD[kind]
    check_outputs(outputs, size)
    if note:
        assert note in outputs[3], outputs[3]
    if size == (512, 512):  # the same face found, upright (EXIF applied once, not twice)
        np.testing.assert_allclose(outputs[4].result.box, astronaut_box, atol=12)
    if kind == "two faces":  # Grace Hopper's face, on the right, is the larger one
        assert outputs[4].result.box[0] > 512
        assert "was used" in outputs[3]


BROKEN = {
    "text": "This file could not be read as a photo: cannot read text.png: cannot identify",
    "truncated": "This file could not be read as a photo: cannot read truncated.jpg: image file "
    "is truncated",
    "bomb": "cannot read bomb.png: Image size (10000000000 pixels) exceeds limit of",
    "tiny": "No face found: the image (10x10 px) is smaller than the smallest detectable face",
    "no face": "No face found in the image. Try a photo where the face is larger",
}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_photos_raise_clear_messages(
    tmp_path, monkeypatch, pipeline, astronaut, grace_hopper, kind
):
    path = write_photo(kind, astronaut, grace_hopper, tmp_path)
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 512)
    with pytest.raises(gr.Error) as error:
        age(pipeline, path)
    assert BROKEN[kind] in error.value.message
    assert str(tmp_path) not in error.value.message  # the server's paths stay private


def test_any_decoder_failure_is_a_clear_message(tmp_path, monkeypatch, pipeline):
    def corrupt_tiff(path, name=None):  # what PIL raised on one corrupt TIFF in a fuzzing run
        raise TypeError("Missing dimensions")

    monkeypatch.setattr(agecgan.service, "read_photo", corrupt_tiff)
    (tmp_path / "scan.tif").write_bytes(b"II*\x00")
    with pytest.raises(gr.Error) as error:
        age(pipeline, tmp_path / "scan.tif")
    assert error.value.message == "This file could not be read as a photo: Missing dimensions"


def test_a_photo_over_the_pixel_cap_is_refused(monkeypatch, pipeline, grace_hopper):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 600 - 1)  # PIL itself only warns
    with pytest.raises(gr.Error) as error:
        age(pipeline, grace_hopper)
    assert "512x600 is more than the 307,199 pixels allowed" in error.value.message


@pytest.mark.parametrize(
    ("photo", "input_age", "steps", "message"),
    [
        (None, None, 0, "Upload a photo, take one with the webcam, or pick an example first"),
        ({"path": None}, None, 0, "Upload a photo"),
        ("photo.png", -3, 0, "The age must be between 1 and 120 years, not -3"),
        ("photo.png", 121, 0, "The age must be between 1 and 120 years, not 121"),
        ("photo.png", "old", 0, "The age must be a number of years"),
        ("photo.png", 30, 1000, "Identity steps must be between 0 and 100"),
    ],
)
def test_bad_settings_raise_clear_messages(pipeline, photo, input_age, steps, message):
    with pytest.raises(gr.Error) as error:
        webapp.age_photo(pipeline, photo, input_age, True, steps)
    assert message in error.value.message


@pytest.mark.parametrize(
    ("drawing", "message"),
    [
        (("painted", 1, 0), "The drawing must be one of generated, detail, not 'painted'"),
        (("detail", -1, 0), "The strength must be a number from 0 to 3, not -1"),
        (("detail", "lots", 0), "The strength must be a number from 0 to 3, not 'lots'"),
        (("generated", 1, 500), "Adaptation steps must be between 0 and 100"),
        (("generated", 1, 2.5), "Adaptation steps must be between 0 and 100"),
    ],
)
def test_bad_drawing_options_raise_clear_messages(pipeline, grace_hopper, drawing, message):
    with pytest.raises(gr.Error) as error:
        webapp.age_photo(pipeline, str(grace_hopper), 40, False, 0, *drawing)
    assert message in error.value.message


def test_detail_drawing_and_adaptation_reach_the_sliders(pipeline, grace_hopper):
    """The options given to Age are kept in the session: the sliders draw the same way."""
    faces, pasted, _, _, session = webapp.age_photo(
        pipeline, str(grace_hopper), 77, False, 0, "detail", 2.0, 3
    )
    result = session.result
    assert (result.render, result.strength, result.adaptation.steps) == ("detail", 2.0, 3)
    face, photo = webapp.blend(pipeline, session, 0, 0, 0, 0, 0, 1)
    assert np.array_equal(pixels(face), pixels(faces[6][0]))
    plain, *_ = webapp.age_photo(pipeline, str(grace_hopper), 77, False, 0, "generated")
    assert not np.array_equal(pixels(plain[1][0]), pixels(faces[1][0]))  # 0-18: drawn otherwise


def test_uploads_are_deleted_and_reruns_use_the_session(uploads, pipeline, astronaut):
    folder = uploads / "0123abcd"  # how Gradio stores an upload: a folder per file
    folder.mkdir()
    path = folder / "me.png"
    Image.fromarray(astronaut).save(path)
    upload = {"path": str(path), "orig_name": "me.png"}  # as the UI passes it
    *_, gif, notes, session = age(pipeline, upload, input_age=35)
    assert not path.exists() and not folder.exists()
    assert Path(gif).is_relative_to(uploads)  # results are served from, and swept with, the cache
    # The same photo again with another age: read from the session, not from the deleted file.
    again = webapp.age_photo(pipeline, upload, 65, False, 0, session=session)
    assert again[0][0][1] == "reconstruction (60+)"
    _, photo = webapp.blend(pipeline, again[4], *np.eye(6)[5])
    np.testing.assert_array_equal(pixels(again[1][5][0]), pixels(photo))
    with pytest.raises(gr.Error) as error:  # a new session has no copy: upload again
        age(pipeline, upload)
    assert "no longer on the server" in error.value.message


def test_sliders_render_from_the_session(pipeline, grace_hopper):
    faces, pasted, _, _, session = age(pipeline, grace_hopper, input_age=77)
    for bucket in range(6):
        face, photo = webapp.blend(pipeline, session, *np.eye(6)[bucket])
        # G of 2 conditions and of 7 differ by ~3e-7 (float sums in another order), which at
        # strength 1.25 can round a pixel of the face the other way (PNG: one level), and the
        # photos are JPEGs, whose blocks spread such a flip over a few levels.
        difference = np.abs(pixels(face).astype(int) - pixels(faces[bucket + 1][0]))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001
        difference = np.abs(pixels(photo).astype(int) - pixels(pasted[bucket][0]))
        assert difference.max() <= 8 and difference.mean() < 0.01
    face, photo, *weights = webapp.sweep(pipeline, session, 5)
    assert weights == [0, 0, 0, 0, 0, 1]
    np.testing.assert_array_equal(pixels(face), pixels(faces[6][0]))
    mixed, _, *weights = webapp.sweep(pipeline, session, 2.25)
    assert weights == [0, 0, 0.75, 0.25, 0, 0]
    blended, _ = webapp.blend(pipeline, session, 0, 0, 3, 1, 0, 0)
    np.testing.assert_array_equal(pixels(mixed), pixels(blended))
    with pytest.raises(gr.Error) as error:
        webapp.blend(pipeline, session, 0, 0, 0, 0, 0, 0)
    assert "Set at least one age slider above 0" in error.value.message
    with pytest.raises(gr.Error) as error:
        webapp.sweep(pipeline, None, 2)
    assert "Age a photo first" in error.value.message


def test_api_answers_ten_concurrent_users(tmp_path, monkeypatch, uploads, pipeline, astronaut):
    from gradio_client import Client, handle_file

    # gradio_client downloads each file through a folder of its own in the system's temp
    # folder and leaves that folder behind: keep them in this test's folder.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    photos = []
    for user in range(10):  # ten people, ten files, one face: ten identical results at once
        photos.append(tmp_path / f"user{user}.png")
        Image.fromarray(astronaut).save(photos[-1])
    digest = hashlib.sha256(photos[0].read_bytes()).hexdigest()
    demo = webapp.build_demo(pipeline)
    port = free_port()
    webapp.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        url = f"http://127.0.0.1:{port}/"

        def call(photo, identity=False, steps=0, client=None):
            client = client or Client(url, verbose=False, download_files=str(tmp_path / "dl"))
            return client.predict(handle_file(str(photo)), 40, identity, steps, api_name="/age")

        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"))
        faces, pasted, gif, _ = call(photos[0], identity=True, steps=2, client=client)
        assert [face["caption"] for face in faces] == ["reconstruction (40-49)", *BUCKET_LABELS]
        assert Image.open(faces[3]["image"]).size == (256, 256)
        assert Image.open(pasted[5]["image"]).size == (512, 512)
        assert Image.open(gif).n_frames == FRAMES
        # The sliders' endpoints render from the session's z (gr.State), without the encoder.
        face, photo = client.predict(0, 0, 0, 0, 0, 1, api_name="/blend")
        assert Image.open(face).size == (256, 256) and Image.open(photo).size == (512, 512)
        face, photo, *weights = client.predict(2.5, api_name="/sweep")
        assert weights == [0, 0, 0.5, 0.5, 0, 0] and Image.open(photo).size == (512, 512)
        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(call, photos))
        assert len(answers) == 10
        assert all(len(a[0]) == 7 and len(a[1]) == 6 and Path(a[2]).is_file() for a in answers)
        # No copy of any upload is left in Gradio's folder: each was deleted once read.
        left = [p for p in uploads.rglob("*") if p.is_file()]
        assert all(hashlib.sha256(p.read_bytes()).hexdigest() != digest for p in left)
        # Bad input answers with the message, and the server keeps serving.
        (tmp_path / "notes.txt").write_text("not an image\n")
        with pytest.raises(Exception, match="could not be read as a photo"):
            call(tmp_path / "notes.txt")
        assert len(call(photos[1])[0]) == 7
    finally:
        demo.close()


def test_without_a_model_the_app_starts_and_says_so(tmp_path, monkeypatch, uploads, grace_hopper):
    from gradio_client import Client, handle_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gradio_client's leftovers
    monkeypatch.setattr(agecgan.pipeline, "DEFAULT_MODEL", tmp_path)  # no model files
    pipeline, message = webapp.load_pipeline(None)
    assert pipeline is None and message == webapp.NO_MODEL
    assert "The shipped model is missing from checkpoints/" in message
    assert "--model DIR" in message
    demo = webapp.build_demo(pipeline, message)
    shown = [
        block.value
        for block in demo.blocks.values()
        if isinstance(block, gr.Markdown) and isinstance(block.value, str)
    ]
    assert any(webapp.NO_MODEL in text for text in shown)
    for handler, args in [
        (webapp.age_photo, (grace_hopper, 40, False, 0)),
        (webapp.blend, (None, 1, 0, 0, 0, 0, 0)),
        (webapp.sweep, (None, 2.0)),
    ]:
        with pytest.raises(gr.Error) as error:
            handler(None, *args)
        assert error.value.message == webapp.NO_MODEL
    _, message = webapp.load_pipeline(str(tmp_path / "nowhere"))
    assert "is not a model folder" in message
    port = free_port()  # the server starts, and answers with the message
    webapp.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        with pytest.raises(Exception, match="The shipped model is missing"):
            client.predict(handle_file(str(grace_hopper)), 77, False, 0, api_name="/age")
    finally:
        demo.close()


# What both apps share (agecgan.service), and what the issues found through the real server.


@pytest.mark.parametrize(
    ("input_age", "steps", "message"),
    [
        (float("inf"), 0, "The age must be a number of years, not inf"),
        (float("nan"), 0, "The age must be a number of years, not nan"),
        ("abc", 0, "The age must be a number of years, not 'abc'"),
        (30, float("nan"), "Identity steps must be between 0 and 100 (a whole number), not nan"),
        (30, "abc", "Identity steps must be between 0 and 100 (a whole number), not 'abc'"),
        (30, float("inf"), "Identity steps must be between 0 and 100"),
        (30, 2.5, "Identity steps must be between 0 and 100"),
    ],
)
def test_odd_numbers_get_clear_messages_and_the_upload_goes_at_once(
    uploads, pipeline, astronaut, input_age, steps, message
):
    folder = uploads / "odd"
    folder.mkdir(exist_ok=True)
    Image.fromarray(astronaut).save(folder / "me.png")
    with pytest.raises(gr.Error) as error:
        webapp.age_photo(pipeline, {"path": str(folder / "me.png")}, input_age, True, steps)
    assert message in error.value.message
    assert not (folder / "me.png").exists()  # refused: deleted now, not at the next sweep


def test_odd_slider_values_get_clear_messages(pipeline, grace_hopper):
    *_, session = age(pipeline, grace_hopper, input_age=77)
    for position in (float("nan"), float("inf"), "abc", 7):
        with pytest.raises(gr.Error) as error:
            webapp.sweep(pipeline, session, position)
        assert "The age position must be a number from 0 to 5" in error.value.message
    for weights in ([float("nan"), 0, 0, 0, 0, 1], [float("inf"), 0, 0, 0, 0, 1], [1, 2]):
        with pytest.raises(gr.Error) as error:
            webapp.blend(pipeline, session, *weights)
        assert "Give 6 age weights, each a number of 0 or more" in error.value.message


def test_notes_carry_a_kind(pipeline, astronaut, grace_hopper, tmp_path):
    path = write_photo("two faces", astronaut, grace_hopper, tmp_path)
    image, read_notes = agecgan.service.read_upload(path, "two.png")
    aged = agecgan.service.age_photo(pipeline, image, read_notes, None, False, 0)
    kinds = {str(note): note.kind for note in aged.notes}
    [warning] = [text for text, kind in kinds.items() if kind == "warning"]
    assert warning.startswith("2 faces found; the largest (box ")
    [estimated] = [text for text in kinds if text.startswith("input age not given")]
    assert kinds[estimated] == "info"
    # The Gradio app shows the warning in bold, the others as they are.
    notes = age(pipeline, path)[3]
    assert f"- **{warning}**" in notes and f"- {estimated}" in notes


def test_empty_folders_in_the_cache_are_swept(tmp_path):
    cache, old = tmp_path / "cache", time.time() - 600
    for name in ("old-empty/inner", "young-empty", "old-full"):
        (cache / name).mkdir(parents=True)
    (cache / "old-full" / "face.png").write_bytes(b"png")
    for name in ("old-empty/inner", "old-empty", "old-full"):
        os.utime(cache / name, (old, old))
    assert webapp.sweep_empty_folders(cache, 60) == 1  # inner; its parent was touched by that
    assert webapp.sweep_empty_folders(cache, 0) == 2  # now old-empty, and young-empty
    assert sorted(p.name for p in cache.iterdir()) == ["old-full"]


def test_without_spaces_the_gpu_part_runs_in_the_pipeline(monkeypatch, pipeline, grace_hopper):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` fails, as on a laptop
    plain = load_app("agecgan_app_without_spaces")
    assert plain.spaces is None and plain._faces_from(pipeline) is None
    faces, pasted, gif, _, session = plain.age_photo(
        pipeline, grace_hopper, 77, True, 2, progress=lambda *a, **k: None
    )
    assert faces[0][1] == "reconstruction (60+)" and len(pasted) == 6 and Path(gif).is_file()
    assert isinstance(session, plain.Session)


def test_zero_gpu_gets_a_key_and_a_face_and_never_a_slider(monkeypatch, pipeline, grace_hopper):
    """ZeroGPU runs @spaces.GPU functions in a worker, their arguments and results pickled
    across. That worker cannot run here: this stand-in pickles both ways, as ZeroGPU does, and
    counts the calls; the real `spaces` package is installed and its decorator is in place."""
    import spaces

    assert webapp.spaces is spaces
    calls, gpu_function = [], webapp.faces_on_gpu

    def across_the_boundary(*args):
        sent = pickle.dumps(args)
        calls.append(len(sent))
        return pickle.loads(pickle.dumps(gpu_function(*pickle.loads(sent))))

    monkeypatch.setattr(webapp, "ZERO_GPU", True)  # no progress callback crosses
    monkeypatch.setattr(webapp, "faces_on_gpu", across_the_boundary)
    faces, *_, session = webapp.age_photo(pipeline, grace_hopper, 77, True, 2)
    assert len(calls) == 1 and calls[0] < 20_000  # a key, a 64x64 face, three numbers
    assert faces[0][1] == "reconstruction (60+)"
    webapp.blend(pipeline, session, 0, 0, 0, 0, 0, 1)
    webapp.sweep(pipeline, session, 2.5)
    assert len(calls) == 1  # the sliders render on the CPU
    assert webapp.gpu_seconds(0, None, 3, False, 100) == 12  # 5 s + 100 x 65 ms, measured


@pytest.fixture(scope="module")
def server(tmp_path_factory, uploads, pipeline):
    """The real app on a loopback port, sweeping empty folders every second."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(webapp, "CACHE_SWEEP_S", 1)
        demo = webapp.build_demo(pipeline)
        with serving(webapp, demo) as url:
            yield url


def client_of(url: str, tmp_path: Path):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(tmp_path / "downloads"))


def left_in(uploads: Path, photo: Path) -> list[Path]:
    """Copies of a photo's bytes still in Gradio's upload folder."""
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    files = [p for p in uploads.rglob("*") if p.is_file()]
    return [p for p in files if hashlib.sha256(p.read_bytes()).hexdigest() == digest]


def test_ten_users_sending_the_same_photo_at_once_all_get_answers(
    tmp_path, monkeypatch, uploads, server, astronaut
):
    from gradio_client import handle_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # gradio_client's leftovers
    photo = tmp_path / "me.png"  # one file, one name: the same server path for everyone
    Image.fromarray(astronaut).save(photo)
    clients = [client_of(server, tmp_path) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        answers = list(
            pool.map(
                lambda client: client.predict(
                    handle_file(str(photo)), 40, False, 0, api_name="/age"
                ),
                clients,
            )
        )
    assert all(len(faces) == 7 and len(pasted) == 6 for faces, pasted, *_ in answers)
    assert not left_in(uploads, photo)  # each upload went with its request


def raw_call(url: str, endpoint: str, body: str) -> str:
    """POST a JSON body as written (Infinity and NaN included, which gradio_client refuses to
    send) to one of the app's endpoints; returns the event stream of its answer."""
    import httpx

    with httpx.Client(base_url=url, timeout=60) as http:
        sent = http.post(f"gradio_api/call/{endpoint}", content=body, headers=JSON)
        answer = http.get(f"gradio_api/call/{endpoint}/{sent.json()['event_id']}")
    return answer.text


JSON = {"Content-Type": "application/json"}


def test_odd_numbers_through_the_api_get_the_apps_messages(uploads, server, astronaut, tmp_path):
    import httpx

    photo = tmp_path / "odd.png"
    Image.fromarray(astronaut).save(photo)
    for age, steps, strength, message in [
        ("Infinity", "0", "1", "The age must be a number of years, not inf"),
        ('"inf"', "0", "1", "The age must be a number of years, not 'inf'"),
        ("30", "NaN", "1", "Identity steps must be between 0 and 100 (a whole number), not nan"),
        (
            "30",
            '"abc"',
            "1",
            "Identity steps must be between 0 and 100 (a whole number), not 'abc'",
        ),
        ("30", "0", "NaN", "The strength must be a number from 0 to 3, not nan"),
    ]:
        with photo.open("rb") as file:
            [path] = httpx.post(f"{server}gradio_api/upload", files={"files": file}).json()
        data = (
            f'{{"path": "{path}", "orig_name": "odd.png", "meta": {{"_type": "gradio.FileData"}}}}'
        )
        values = f'{data}, {age}, false, {steps}, "detail", {strength}, 0'
        events = raw_call(server, "age", f'{{"data": [{values}]}}')
        assert "event: error" in events and message in events, events
        assert not left_in(uploads, photo)  # refused, and deleted with the refusal
    # The sliders' endpoints, in one session (session_hash) that has aged a photo first.
    with photo.open("rb") as file:
        [path] = httpx.post(f"{server}gradio_api/upload", files={"files": file}).json()
    data = f'{{"path": "{path}", "orig_name": "odd.png", "meta": {{"_type": "gradio.FileData"}}}}'
    session = '"session_hash": "odd-numbers"'
    events = raw_call(
        server, "age", f'{{"data": [{data}, 30, false, 0, "generated", 1, 0], {session}}}'
    )
    assert "event: complete" in events, events
    for endpoint, values, message in [
        ("sweep", "NaN", "The age position must be a number from 0 to 5, not nan"),
        ("blend", "NaN, 0, 0, 0, 0, 1", "Give 6 age weights, each a number of 0 or more"),
    ]:
        events = raw_call(server, endpoint, f'{{"data": [{values}], {session}}}')
        assert "event: error" in events and message in events, events


def test_a_photo_given_as_a_url_is_refused_unfetched(tmp_path, monkeypatch, server, grace_hopper):
    from gradio_client import handle_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fetched = []

    class Photos(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a photo, then 30 MB more: over the upload limit
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(grace_hopper.read_bytes() + b"\0" * (30 * 2**20))

        def log_message(self, *args):
            pass

    photos = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Photos)
    threading.Thread(target=photos.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{photos.server_address[1]}/photo.jpg"
        with pytest.raises(Exception, match="Photos are taken as files only, not as URLs"):
            client_of(server, tmp_path).predict(handle_file(url), 40, False, 0, api_name="/age")
    finally:
        photos.shutdown()
    assert not fetched


def test_the_server_sweeps_empty_folders(uploads, server):
    folder, old = uploads / "emptied-results", time.time() - 120
    folder.mkdir()
    os.utime(folder, (old, old))
    deadline = time.monotonic() + 10
    while folder.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not folder.exists()


def test_the_soak_script_answers_every_request(tmp_path, pipeline):
    """bench/soak.py, briefly, on a tiny model: the README's soak figures come from it."""
    model = tmp_path / "model"
    torch.manual_seed(0)
    export_model(model, TINY, encoder=Encoder(TINY), generator=vivid_generator())
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--model", str(model)]
    command += ["--requests", "16", "--threads", "4", "--warmup", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert "answered          16/16" in done.stdout, done.stdout + done.stderr
    assert "memory (RSS)" in done.stdout and "after 16:" in done.stdout
