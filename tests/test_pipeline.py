"""The aging pipeline on real photos with tiny untrained networks, and its command line."""

import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
import torch
from helpers import TINY, estimated_bucket
from PIL import Image
from safetensors.torch import load_file, save_file

import agecgan.pipeline
from agecgan import (
    BUCKET_LABELS,
    AgingPipeline,
    Encoder,
    FaceNotFoundError,
    Generator,
    ImageReadError,
)
from agecgan.age_estimator import AgeEstimator
from agecgan.ages import age_to_bucket
from agecgan.align import warp_face
from agecgan.checkpoints import export_model
from agecgan.pipeline import AgingResult, age_weights, paste_change, paste_face

PHOTOS = ("astronaut", "grace_hopper", "camera")
SIZE = 96  # output_size in these tests: not the default, to see that it is honoured


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    export_model(folder, TINY, encoder=Encoder(TINY), generator=Generator(TINY))
    return folder


@pytest.fixture(scope="module")
def pipeline(model, aligner):  # aligner: the shared MTCNN, on one thread
    return AgingPipeline.from_pretrained(model, device="cpu")


@pytest.fixture(scope="module")
def results(request, pipeline):
    """Each photo aged once, without identity optimization, G's own faces pasted back (the
    paste-back geometry is seen best on them): name -> AgingResult."""
    drawing = dict(render="generated", strength=1.0, adapt_steps=0)  # G's own, untuned
    options = dict(optimize_identity=False, output_size=SIZE, **drawing)
    return {name: pipeline(request.getfixturevalue(name), **options) for name in PHOTOS}


def photo_array(result: AgingResult) -> np.ndarray:
    return np.asarray(result.photo)


def box_iou(a, b) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


@pytest.mark.parametrize("name", PHOTOS)
def test_result_fields(results, pipeline, name):
    result = results[name]
    width, height = result.photo.size
    assert len(result.box) == 4 and 0 <= result.box[0] < result.box[2] <= width
    assert result.aligned.size == (64, 64) and result.aligned.mode == "RGB"
    assert result.reconstruction.size == (SIZE, SIZE)
    assert len(result.aged) == len(result.pasted) == 6
    for face, pasted in zip(result.aged, result.pasted, strict=True):
        assert isinstance(face, Image.Image) and face.size == (SIZE, SIZE) and face.mode == "RGB"
        assert isinstance(pasted, Image.Image) and pasted.size == (width, height)
    assert result.z.shape == (1, TINY.z_dim) and result.z.device.type == "cpu"
    assert result.num_faces == 1
    # No age given: the shipped age estimator reads it from the photo around the aligned face,
    # and says so.
    assert estimated_bucket(result.notes) == BUCKET_LABELS[result.input_bucket]
    estimate = AgeEstimator.from_pretrained(framing=pipeline.framing).photo_ages(
        photo_array(result), result.matrix[None]
    )[0]
    assert result.input_age == pytest.approx(estimate)
    assert result.input_bucket == age_to_bucket(max(1, int(estimate)))
    assert result.grayscale == (name == "camera")  # the cameraman is a 2-D gray array
    if result.grayscale:
        rgb = np.asarray(result.aged[0]).astype(int)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


@pytest.mark.parametrize("name", PHOTOS)
def test_paste_touches_only_the_face(results, name):
    result = results[name]
    photo = photo_array(result)
    corners = np.array([[0, 0, 1], [64, 0, 1], [0, 64, 1], [64, 64, 1]])
    on_photo = corners @ cv2.invertAffineTransform(result.matrix.astype(np.float64)).T
    (x0, y0), (x1, y1) = np.floor(on_photo.min(0)).astype(int), np.ceil(on_photo.max(0)).astype(int)
    outside = np.ones(photo.shape[:2], bool)
    outside[max(y0, 0) : y1, max(x0, 0) : x1] = False
    bx0, by0, bx1, by1 = (round(v) for v in result.box)
    for pasted in map(np.asarray, result.pasted):
        np.testing.assert_array_equal(pasted[outside], photo[outside])
        assert (pasted[by0:by1, bx0:bx1] != photo[by0:by1, bx0:bx1]).any()


def test_paste_back_geometry_matches_the_alignment(results):
    """Pasting the aligned input itself back reproduces the photo (up to 64 px blur)."""
    result = results["astronaut"]
    photo = photo_array(result)
    pasted = paste_face(photo, np.asarray(result.aligned), result.matrix)
    x0, y0, x1, y1 = (round(v) for v in result.box)
    error = np.abs(pasted[y0:y1, x0:x1].astype(int) - photo[y0:y1, x0:x1]).mean()
    assert error < 6


def test_render_mixes_ages(pipeline, results):
    result = results["astronaut"]
    for bucket in range(6):
        face, pasted = pipeline.render(result, np.eye(6)[bucket])
        np.testing.assert_array_equal(np.asarray(face), np.asarray(result.aged[bucket]))
        np.testing.assert_array_equal(np.asarray(pasted), np.asarray(result.pasted[bucket]))
    mix, _ = pipeline.render(result, [0, 0, 0.5, 0.5, 0, 0])
    for bucket in (2, 3):
        assert not np.array_equal(np.asarray(mix), np.asarray(result.aged[bucket]))
    unnormalized, _ = pipeline.render(result, [0, 0, 3, 3, 0, 0])
    np.testing.assert_array_equal(np.asarray(unnormalized), np.asarray(mix))
    for bad in ([1, 0, 0], [0, 0, 0, 0, 0, 0], [1, -1, 1, 0, 0, 0]):
        with pytest.raises(ValueError, match="non-negative"):
            pipeline.render(result, bad)


def generated_faces(pipeline, result) -> np.ndarray:
    """G's own faces at the input's bucket, then the six buckets, as float pixel levels."""
    conditions = torch.cat([torch.eye(6)[[result.input_bucket]], torch.eye(6)])
    return pipeline._generate(result.z, conditions, result.adaptation)


def test_detail_rendering_adds_only_the_change_to_the_photo(pipeline, astronaut):
    """render="detail": each 64 px face is the aligned input plus strength x (G_k - G_own),
    and the photo gets the same change through the mask, so strength 0 returns the photo."""
    still = pipeline(astronaut, optimize_identity=False, render="detail", strength=0.0)
    x = np.asarray(still.aligned)
    for face, pasted in zip(still.aged, still.pasted, strict=True):
        small = np.asarray(face.resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
        assert np.abs(small - x).mean() < 3  # the input itself, up to the display resize
        np.testing.assert_array_equal(np.asarray(pasted), astronaut)  # not a pixel changed
    for strength in (1.0, 2.0):
        result = pipeline(astronaut, optimize_identity=False, render="detail", strength=strength)
        assert (result.render, result.strength) == ("detail", strength)
        g = generated_faces(pipeline, result)
        expected = np.clip(np.rint(x + strength * (g[1:] - g[:1])), 0, 255).astype(np.uint8)
        faces, changes = pipeline._compose(result, g)
        np.testing.assert_array_equal(faces[1:], expected)
        np.testing.assert_array_equal(faces[0], x)  # the "reconstruction" is the photo's face
        photo = paste_change(astronaut, changes[6], result.matrix, pipeline.framing)
        np.testing.assert_array_equal(np.asarray(result.pasted[5]), photo)
        # render() and progression() draw as the result was drawn.
        face, pasted = pipeline.render(result, np.eye(6)[5])
        np.testing.assert_array_equal(np.asarray(face), np.asarray(result.aged[5]))
        np.testing.assert_array_equal(np.asarray(pasted), np.asarray(result.pasted[5]))
        frames = pipeline.progression(result, frames=3)
        np.testing.assert_array_equal(np.asarray(frames[0]), np.asarray(result.aged[0]))


def test_paste_change_adds_a_smooth_change_inside_the_mask_only(results):
    result = results["astronaut"]
    photo = photo_array(result)
    brighter = paste_change(photo, np.full((64, 64, 3), 40.0), result.matrix)
    added = brighter.astype(int) - photo
    assert added.min() >= 0 and added.max() <= 40  # the mask's opacity is at most 1
    x0, y0, x1, y1 = (round(v) for v in result.box)
    centre = added[(y0 + y1) // 2, (x0 + x1) // 2]
    assert (centre >= 39).all() or (photo[(y0 + y1) // 2, (x0 + x1) // 2] > 215).any()
    assert (added[:, : max(x0 - 60, 1)] == 0).all()  # far from the face: untouched
    np.testing.assert_array_equal(paste_change(photo, np.zeros((64, 64, 3)), result.matrix), photo)


def test_strength_scales_the_generated_change(pipeline, astronaut):
    result = pipeline(astronaut, optimize_identity=False, render="generated", strength=0.5)
    g = generated_faces(pipeline, result)
    faces, _ = pipeline._compose(result, g)
    expected = np.clip(np.rint(g[:1] + 0.5 * (g[1:] - g[:1])), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(faces[1:], expected)
    plain = pipeline(astronaut, optimize_identity=False, render="generated", strength=1.0)
    g = generated_faces(pipeline, plain)
    faces, _ = pipeline._compose(plain, g)
    np.testing.assert_array_equal(faces[1:], np.rint(g[1:]).astype(np.uint8))  # G's own


def test_adaptation_fits_the_photo_and_leaves_the_shipped_g_alone(pipeline, astronaut):
    before = {k: v.clone() for k, v in pipeline.generator.state_dict().items()}
    drawn = dict(optimize_identity=False, render="generated")  # G's own faces, to compare
    plain = pipeline(astronaut, **drawn, adapt_steps=0)
    calls = []
    adapted = pipeline(astronaut, **drawn, adapt_steps=15, progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(step, 15) for step in range(1, 16)]
    assert adapted.adaptation is not None and adapted.adaptation.steps == 15
    for name, tensor in pipeline.generator.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    assert all(p.requires_grad for p in pipeline.generator.parameters())
    x = np.asarray(plain.aligned).astype(float)

    def error(result):
        small = result.reconstruction.resize((64, 64), Image.Resampling.LANCZOS)
        return np.abs(np.asarray(small).astype(float) - x).mean()

    assert error(adapted) < error(plain)  # G' draws this face better than G
    face, _ = pipeline.render(adapted, np.eye(6)[2])  # the sliders use G'
    np.testing.assert_array_equal(np.asarray(face), np.asarray(adapted.aged[2]))
    assert not np.array_equal(np.asarray(face), np.asarray(plain.aged[2]))


def test_two_adaptations_at_once_each_draw_their_own_photo(pipeline, astronaut, grace_hopper):
    """Two requests adapting G at the same time (an app's two aging slots) get exactly what each
    gets alone: no request trains, or draws, with the other's tuned weights."""
    drawn = dict(optimize_identity=False, render="generated", adapt_steps=8)
    photos = [astronaut, grace_hopper] * 2
    alone = [pipeline(photo, **drawn) for photo in photos[:2]]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda photo: pipeline(photo, **drawn), photos))
        sliders = list(pool.map(lambda r: pipeline.render(r, np.eye(6)[4])[0], together))
    for i, result in enumerate(together):
        expected = alone[i % 2]
        for name, tensor in expected.adaptation.synthesis.items():
            torch.testing.assert_close(result.adaptation.synthesis[name], tensor, rtol=0, atol=0)
        np.testing.assert_array_equal(np.asarray(sliders[i]), np.asarray(expected.aged[4]))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"render": "painted"}, "render must be one of generated, detail"),
        ({"strength": -0.5}, "strength must be a number from 0 to 3"),
        ({"strength": 3.5}, "strength must be a number from 0 to 3"),
        ({"strength": "1"}, "strength must be a number"),
        ({"adapt_steps": 1.5}, "adapt_steps must be a whole number"),
        ({"adapt_steps": True}, "adapt_steps must be a whole number"),
        ({"adapt_steps": -1}, "adapt_steps must be from 0 to 200"),
    ],
)
def test_bad_rendering_options_are_refused_before_any_work(pipeline, options, message):
    with pytest.raises(ValueError, match=message):
        pipeline("no such photo.jpg", **options)  # refused before the file is even read


def test_age_weights_interpolate_neighbours():
    np.testing.assert_allclose(age_weights(0), np.eye(6)[0])
    np.testing.assert_allclose(age_weights(5), np.eye(6)[5])
    np.testing.assert_allclose(age_weights(2.25), [0, 0, 0.75, 0.25, 0, 0])


def test_progression_sweeps_youngest_to_oldest(pipeline, results):
    result = results["grace_hopper"]
    frames = pipeline.progression(result, frames=11)
    assert len(frames) == 11 and all(f.size == (SIZE, SIZE) for f in frames)
    np.testing.assert_array_equal(np.asarray(frames[0]), np.asarray(result.aged[0]))
    np.testing.assert_array_equal(np.asarray(frames[-1]), np.asarray(result.aged[5]))
    photos = pipeline.progression(result, frames=3, pasted=True)
    assert [p.size for p in photos] == [result.photo.size] * 3


def test_input_age_in_years_sets_the_bucket(pipeline, astronaut):
    result = pipeline(astronaut, input_age=45, optimize_identity=False)
    assert result.input_bucket == 3 and not any("age" in note for note in result.notes)
    with pytest.raises(ValueError, match="positive"):
        pipeline(astronaut, input_age=0, optimize_identity=False)


def test_identity_optimization_moves_z_and_reports_progress(pipeline, results, astronaut):
    calls = []
    result = pipeline(
        astronaut,
        identity_steps=3,
        adapt_steps=0,
        progress=lambda *args: calls.append(args),
        output_size=SIZE,
    )
    assert [call[:2] for call in calls] == [(1, 3), (2, 3), (3, 3)]
    assert not torch.equal(result.z, results["astronaut"].z)
    assert pipeline.encoder.training is False and pipeline.generator.training is False


def test_missing_model_folders_raise_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        AgingPipeline.from_pretrained(tmp_path / "nowhere")
    monkeypatch.setattr(agecgan.pipeline, "DEFAULT_MODEL", tmp_path)
    with pytest.raises(FileNotFoundError, match="the shipped Age-cGAN model is missing"):
        AgingPipeline.from_pretrained()


def test_weights_load_strictly(tmp_path, model):
    for name in ("config.json", "encoder.safetensors", "generator.safetensors"):
        (tmp_path / name).write_bytes((model / name).read_bytes())
    tensors = load_file(tmp_path / "encoder.safetensors")
    del tensors["features.0.weight"]
    save_file(tensors, tmp_path / "encoder.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        AgingPipeline.from_pretrained(tmp_path, device="cpu")


def huge_png(path):
    """A valid 1x1 PNG whose header then claims 100,000 x 100,000 pixels."""
    Image.new("RGB", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("text", ImageReadError, "cannot read"),
        ("truncated", ImageReadError, "truncated"),
        ("bomb", ImageReadError, "decompression bomb"),
        ("over the cap", ImageReadError, "MAX_IMAGE_PIXELS"),
        ("tiny", FaceNotFoundError, "smaller than the smallest detectable face"),
        ("no face", FaceNotFoundError, "no face found"),
    ],
)
def test_bad_inputs_raise_clearly(
    tmp_path, monkeypatch, pipeline, grace_hopper, kind, error, message
):
    path = tmp_path / "photo.png"
    if kind == "text":
        path.write_text("not an image\n")
    elif kind == "truncated":
        path = tmp_path / "photo.jpg"
        path.write_bytes(grace_hopper.read_bytes()[:20_000])
    elif kind == "bomb":
        huge_png(path)
    elif kind == "over the cap":  # PIL itself only warns up to twice its limit
        path = grace_hopper
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 600 - 1)
    elif kind == "tiny":
        Image.new("RGB", (10, 10), "white").save(path)
    else:
        Image.new("RGB", (300, 300), (128, 128, 128)).save(path)
    with pytest.raises(error, match=message):
        pipeline(path, optimize_identity=False)


def write_variant(kind: str, astronaut: np.ndarray, path):
    """The astronaut as an awkward file: path, and the note expected (or None)."""
    image = Image.fromarray(astronaut)
    if kind == "grayscale":
        image.convert("L").save(path.with_suffix(".png"))
        return path.with_suffix(".png"), "grayscale photo"
    if kind == "rgba":
        image.putalpha(200)
        image.save(path.with_suffix(".png"))
        return path.with_suffix(".png"), None
    if kind == "cmyk":
        image.convert("CMYK").save(path.with_suffix(".jpg"), quality=95)
        return path.with_suffix(".jpg"), None
    if kind == "16-bit":
        cv2.imwrite(str(path.with_suffix(".png")), astronaut[..., ::-1].astype(np.uint16) * 257)
        return path.with_suffix(".png"), None
    if kind == "exif-rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": undoes the turn below
        rotated = image.transpose(Image.Transpose.ROTATE_90)
        rotated.save(path.with_suffix(".jpg"), exif=exif, quality=95)
        return path.with_suffix(".jpg"), "EXIF orientation"
    # animated GIF: the astronaut, then a gray frame
    image.save(
        path.with_suffix(".gif"), save_all=True, append_images=[Image.new("RGB", image.size)]
    )
    return path.with_suffix(".gif"), "first of 2 frames"


@pytest.mark.parametrize("kind", ["grayscale", "rgba", "cmyk", "16-bit", "exif-rotated", "gif"])
def test_awkward_formats_work(tmp_path, pipeline, results, astronaut, kind):
    path, note = write_variant(kind, astronaut, tmp_path / "photo")
    with Image.open(path) as opened:  # the file really is what the test claims
        expected_mode = {"rgba": "RGBA", "cmyk": "CMYK", "grayscale": "L", "gif": "P"}
        assert opened.mode == expected_mode.get(kind, "RGB")
    result = pipeline(path, optimize_identity=False, output_size=SIZE)
    assert result.photo.size == (512, 512) and result.photo.mode == "RGB"
    assert box_iou(result.box, results["astronaut"].box) > 0.85
    assert all(p.size == (512, 512) for p in result.pasted)
    if note:
        assert any(note in n for n in result.notes), result.notes


def test_two_faces_use_the_largest_and_say_so(pipeline, astronaut, grace_hopper):
    canvas = Image.new("RGB", (1112, 600), (128, 128, 128))
    canvas.paste(Image.fromarray(astronaut), (0, 0))
    canvas.paste(Image.open(grace_hopper).convert("RGB"), (512, 0))
    result = pipeline(canvas, optimize_identity=False)
    assert result.num_faces == 2
    assert result.box[0] > 512  # Grace Hopper's face is the larger one
    assert any("2 faces found; the largest" in note for note in result.notes)


def test_large_photos_are_detected_small_and_pasted_full_size(
    monkeypatch, pipeline, results, astronaut
):
    monkeypatch.setattr(pipeline.aligner, "detect_side", 256)  # the astronaut is 512 px
    result = pipeline(astronaut, optimize_identity=False, output_size=SIZE)
    np.testing.assert_allclose(result.box, results["astronaut"].box, atol=6)
    aligned = np.asarray(result.aligned, dtype=int)
    # The face is cut from the full-size photo, with landmarks found at half the size.
    np.testing.assert_array_equal(aligned, warp_face(astronaut, result.matrix, 64))
    assert np.abs(aligned - np.asarray(results["astronaut"].aligned)).mean() < 12
    assert all(p.size == (512, 512) for p in result.pasted)


def test_cli_ages_good_photos_and_names_bad_ones(tmp_path, model, astronaut):
    Image.fromarray(astronaut).save(tmp_path / "good.png")
    Image.new("RGB", (300, 300), (128, 128, 128)).save(tmp_path / "empty.png")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "agecgan", "age", "good.png", "empty.png", "--out", "out"]
    command += ["--model", str(model), "--no-identity", "--size", "64", "--frames", "4"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "empty.png: failed: no face found" in run.stderr
    assert "good.png: wrote" in run.stdout
    names = ["good_grid.png", "good_progression.gif"]
    names += [f"good_age_{label}.png" for label in BUCKET_LABELS]
    names += [f"good_pasted_{label}.jpg" for label in BUCKET_LABELS]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert Image.open(out / "good_grid.png").width == 8 * 64
    assert Image.open(out / "good_pasted_60+.jpg").size == (512, 512)
    assert Image.open(out / "good_progression.gif").n_frames == 4 + 2  # forth and back


def test_export_writes_fp16_networks_that_load_back_as_fp32(tmp_path):
    from agecgan.__main__ import main

    torch.manual_seed(0)
    source = tmp_path / "fp32"
    export_model(source, TINY, encoder=Encoder(TINY), generator=Generator(TINY))
    assert main(["export", str(source), str(tmp_path / "fp16")]) == 0
    stored = load_file(tmp_path / "fp16" / "generator.safetensors")
    assert {value.dtype for value in stored.values() if value.is_floating_point()} == {
        torch.float16
    }
    assert not (tmp_path / "fp16" / "discriminator.safetensors").exists()  # none in the source
    pipeline = AgingPipeline.from_pretrained(tmp_path / "fp16", device="cpu")
    original = load_file(source / "generator.safetensors")
    for key, value in pipeline.generator.state_dict().items():
        assert value.dtype == original[key].dtype
        assert torch.allclose(value, original[key], rtol=1e-3, atol=1e-3), key
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 1
