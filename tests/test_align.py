"""Tests of face detection and template alignment, with the real MTCNN on real photos."""

import numpy as np
import pytest
from PIL import Image

from agecgan.align import (
    TEMPLATE,
    FaceNotFoundError,
    ImageReadError,
    align_face,
    read_photo,
    similarity_matrix,
)

PHOTOS = ("astronaut", "grace_hopper", "camera")
# MTCNN boxes (x1, y1, x2, y2) of these photos, measured when it searched them at full size. Its
# boxes move by a few px with the size it searches at (a 1 to 3 px shift of a photo moves them
# by about 4 px on the cameraman and 13 px on Grace Hopper), so they are compared by overlap.
MEASURED_BOXES = {
    "astronaut": (181.1, 62.2, 267.7, 172.1),
    "grace_hopper": (174.4, 119.6, 355.6, 340.5),
    "camera": (199.2, 118.9, 254.3, 192.3),
}
# No similarity transform puts five real landmarks exactly on the template; these bounds
# (crop pixels) sit just above the residual of the best least-squares fit of each photo
# (3.6 px on the astronaut's smile, 5.9 px on the cameraman's three-quarter view).
# How far a real face's landmarks may sit from the template (least squares cannot fit five
# points exactly), in eye distances: the crop's pixels per eye distance change with the framing.
LANDMARK_TOLERANCE = {"astronaut": 0.22, "grace_hopper": 0.19, "camera": 0.36}


@pytest.fixture(scope="module")
def faces(request, aligner):
    """Each photo detected and aligned once: name -> AlignedFace."""
    return {name: aligner(request.getfixturevalue(name)) for name in PHOTOS}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return np.c_[points, np.ones(len(points))] @ matrix.T


def least_squares_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The similarity transform minimising the squared distances, in closed form (complex LS)."""
    source, target = source.astype(np.float64), target.astype(np.float64)
    zs = (source - source.mean(0)) @ [1, 1j]
    zt = (target - target.mean(0)) @ [1, 1j]
    c = np.vdot(zs, zt) / np.vdot(zs, zs)
    linear = np.array([[c.real, -c.imag], [c.imag, c.real]])
    return np.c_[linear, target.mean(0) - linear @ source.mean(0)]


def box_iou(a, b) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0) * max(height, 0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area - inter)


@pytest.mark.parametrize("name", PHOTOS)
def test_align_face_gives_64px_rgb(request, faces, name):
    face = align_face(request.getfixturevalue(name))
    assert isinstance(face, Image.Image)
    assert face.size == (64, 64) and face.mode == "RGB"
    np.testing.assert_array_equal(pixels(face), pixels(faces[name].image))


@pytest.mark.parametrize("name", PHOTOS)
def test_box_matches_measured(faces, name):
    face = faces[name]
    assert box_iou(face.box, MEASURED_BOXES[name]) > 0.85
    assert face.num_faces == 1
    assert face.probability > 0.99


@pytest.mark.parametrize("name", PHOTOS)
def test_quick_search_finds_what_a_full_size_search_finds(
    request, monkeypatch, aligner, faces, name
):
    # The aligner searches a copy 320 px on its shorter side first (the photos are 512 px);
    # searching the photo at full size, as it did before, finds the same face with landmarks
    # within a quarter of the eye distance: a 1 px shift of the photo moves the full-size
    # search's landmarks about as much (0.14 to 0.22 of the eye distance on the cameraman).
    monkeypatch.setattr(aligner, "detect_short_side", 10**6)
    full, quick = aligner(request.getfixturevalue(name)), faces[name]
    eye_distance = np.linalg.norm(full.landmarks[1] - full.landmarks[0])
    moved = np.linalg.norm(quick.landmarks - full.landmarks, axis=1).max() / eye_distance
    assert moved < 0.25, moved
    assert quick.num_faces == full.num_faces == 1
    assert box_iou(quick.box, full.box) > 0.85


@pytest.mark.parametrize("name", PHOTOS)
def test_matrix_maps_landmarks_near_template(faces, name):
    face = faces[name]
    residual = np.linalg.norm(transform(face.matrix, face.landmarks) - TEMPLATE * 64, axis=1)
    eye_distance = np.linalg.norm(TEMPLATE[1] - TEMPLATE[0]) * 64
    assert residual.max() / eye_distance < LANDMARK_TOLERANCE[name], residual


def test_similarity_matrix_is_exact_on_a_similar_face():
    # Landmarks that are the template rotated by 20 degrees, scaled by 3 and shifted.
    angle = np.deg2rad(20)
    rotation = 3 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (TEMPLATE * 64) @ rotation.T + [140.0, 75.0]
    matrix = similarity_matrix(landmarks, 64)
    np.testing.assert_allclose(transform(matrix, landmarks), TEMPLATE * 64, atol=1e-3)


@pytest.mark.parametrize(
    "name",
    [
        "astronaut",
        "grace_hopper",
        "camera",
    ],
)
def test_matrix_fits_landmarks_as_well_as_least_squares(faces, name):
    face, target = faces[name], TEMPLATE * 64
    best = least_squares_similarity(face.landmarks, target)
    rms = np.sqrt(np.mean((transform(face.matrix, face.landmarks) - target) ** 2))
    best_rms = np.sqrt(np.mean((transform(best, face.landmarks) - target) ** 2))
    assert rms <= best_rms + 0.05


@pytest.mark.parametrize("name", PHOTOS)
def test_aligned_crop_holds_a_whole_face(aligner, faces, name):
    upsampled = faces[name].image.resize((256, 256), Image.Resampling.BICUBIC)
    again = aligner(upsampled)
    x1, y1, x2, y2 = again.box
    # The framing is tight (eyebrows to chin, cheek to cheek): MTCNN's box for the face found
    # again in the crop is about as large as the crop and centred on it.
    assert x2 - x1 > 0.75 * 256 and y2 - y1 > 0.9 * 256
    # The cameraman turns three-quarters: the box leans towards his far cheek, at 0.27 to 0.38
    # of the crop's width across 1 px shifts of the photo and the size MTCNN searches it at.
    low = 0.25 if name == "camera" else 0.3
    assert low * 256 < (x1 + x2) / 2 < 0.7 * 256 and 0.3 * 256 < (y1 + y2) / 2 < 0.7 * 256


def test_path_pil_and_array_inputs_agree(tmp_path, aligner, faces, astronaut):
    path = tmp_path / "astronaut.png"
    Image.fromarray(astronaut).save(path)
    expected = pixels(faces["astronaut"].image)  # aligned from the numpy array
    np.testing.assert_array_equal(pixels(aligner(path).image), expected)
    np.testing.assert_array_equal(pixels(aligner(str(path)).image), expected)
    with Image.open(path) as opened:
        np.testing.assert_array_equal(pixels(aligner(opened).image), expected)


def test_exif_orientation_is_honoured(tmp_path, aligner, faces, astronaut):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": undoes the turn below
    Image.fromarray(astronaut).transpose(Image.Transpose.ROTATE_90).save(
        path, exif=exif, quality=95
    )
    with pytest.raises(FaceNotFoundError):  # the stored pixels alone show no upright face
        aligner(np.asarray(Image.open(path)))
    for photo in (path, Image.open(path)):
        face = aligner(photo)
        np.testing.assert_allclose(face.box, faces["astronaut"].box, atol=3.0)
        assert np.abs(pixels(face.image) - pixels(faces["astronaut"].image)).mean() < 8


def test_grayscale_inputs(aligner, faces, grace_hopper):
    assert faces["camera"].image.mode == "RGB"  # the camera photo is a 2-D uint8 array
    face = aligner(Image.open(grace_hopper).convert("L"))
    assert face.image.mode == "RGB" and face.image.size == (64, 64)
    red, green, blue = pixels(face.image).transpose(2, 0, 1)
    assert (red == green).all() and (green == blue).all()
    assert box_iou(face.box, MEASURED_BOXES["grace_hopper"]) > 0.9


def test_rgba_inputs_ignore_alpha(aligner, faces, astronaut):
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    expected = pixels(faces["astronaut"].image)
    np.testing.assert_array_equal(pixels(aligner(rgba).image), expected)
    np.testing.assert_array_equal(pixels(aligner(Image.fromarray(rgba, "RGBA")).image), expected)


def canvas(big: Image.Image, small: Image.Image, shrink: float) -> Image.Image:
    """`big` at full size in the top-left corner, `small` shrunk in the bottom-right one."""
    small = small.resize((round(small.width * shrink), round(small.height * shrink)))
    picture = Image.new("RGB", (1000, 600), (128, 128, 128))
    picture.paste(big, (0, 0))
    picture.paste(small, (1000 - small.width, 600 - small.height))
    return picture


@pytest.mark.parametrize(
    ("big", "small", "shrink"),
    [("astronaut", "grace_hopper", 0.3), ("grace_hopper", "astronaut", 0.5)],
)
def test_largest_face_wins(aligner, astronaut, grace_hopper, big, small, shrink):
    photos = {
        "astronaut": Image.fromarray(astronaut),
        "grace_hopper": Image.open(grace_hopper).convert("RGB"),
    }
    face = aligner(canvas(photos[big], photos[small], shrink))
    assert face.num_faces == 2
    assert box_iou(face.box, MEASURED_BOXES[big]) > 0.8  # big sits at (0, 0): same box


def test_a_small_face_is_found_by_the_second_search(monkeypatch, aligner, astronaut):
    # A face 34 px wide in a 1200 px photo: 9 px in the quick search's 320 px copy, too small
    # there; the second search, at full size, finds it.
    picture = Image.new("RGB", (1200, 1200), (128, 128, 128))
    picture.paste(Image.fromarray(astronaut).resize((200, 200)), (700, 300))
    with monkeypatch.context() as patch:
        patch.setattr(aligner, "detect_side", 320)  # the quick search alone
        with pytest.raises(FaceNotFoundError):
            aligner(picture)
    face = aligner(picture)
    expected = np.array(MEASURED_BOXES["astronaut"]) * 200 / 512 + [700, 300, 700, 300]
    assert face.num_faces == 1
    assert box_iou(face.box, expected) > 0.8


@pytest.mark.parametrize(
    "photo",
    [
        np.full((200, 200, 3), 128, np.uint8),
        np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8),
    ],
    ids=["flat-gray", "noise"],
)
def test_no_face_raises(aligner, photo):
    with pytest.raises(FaceNotFoundError, match="no face"):
        aligner(photo)
    assert issubclass(FaceNotFoundError, ValueError)


def test_tiny_image_raises_face_not_found(aligner):
    with pytest.raises(FaceNotFoundError):
        aligner(np.zeros((19, 19, 3), np.uint8))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing"])
def test_unreadable_file_raises_naming_it(tmp_path, aligner, grace_hopper, kind):
    path = tmp_path / f"{kind}.jpg"
    if kind == "garbage":
        path.write_bytes(b"this is not an image\n" * 10)
    elif kind == "truncated":
        path.write_bytes(grace_hopper.read_bytes()[:100])
    with pytest.raises(ImageReadError, match="cannot read") as caught:
        aligner(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_array_of_wrong_dtype_raises():
    with pytest.raises(ImageReadError, match="uint8"):
        read_photo(np.zeros((64, 64, 3), np.float32))


@pytest.mark.parametrize("channels", [1, 2])
def test_array_with_odd_channel_count_raises(channels):
    with pytest.raises(ImageReadError):
        read_photo(np.zeros((64, 64, channels), np.uint8))


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path, aligner, camera):
    path = tmp_path / "camera16.png"
    Image.fromarray(camera.astype(np.uint16) * 257).save(path)
    face = aligner(path)
    np.testing.assert_allclose(face.box, MEASURED_BOXES["camera"], atol=3.0)
