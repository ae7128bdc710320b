"""Photo -> aligned 64x64 face -> geometry back: the one road every photo takes.

`read_photo` is the one strict reader (path, bytes, PIL image or array). `FaceAligner` detects
with MTCNN on a copy capped in size and cuts the face from the full-size photo with a similarity
transform that maps MTCNN's five landmarks (eyes, nose, mouth corners) onto TEMPLATE. Training
crops, user photos, evaluation and the FR and age chips all use this module's template and crop
geometry, so the networks always see faces placed the same way.
"""

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FACE_SIZE = 64
# Five landmarks (x, y) in a 112x112 face-recognition crop, the template most aligners use:
# left eye, right eye, nose tip, left and right mouth corners (image left/right).
_RECOGNITION_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Framing:
    """How a face sits in its crop: the template above scaled by `scale` about the eyes, with
    the eyes at `eye_height` of the crop. A model is trained on one framing and records it in
    its config.json: the aligner, the paste-back and the FR and age chips follow it."""

    scale: float
    eye_height: float

    def template(self) -> np.ndarray:
        """(5, 2) landmark positions in fractions of the crop side."""
        points = _RECOGNITION_TEMPLATE_112 / 112.0
        eyes = points[:2].mean(axis=0)
        return (points - eyes) * self.scale + np.array([0.5, self.eye_height], np.float32)

    @property
    def eye_distance(self) -> float:
        """Distance between the eye centres, as a fraction of the crop side."""
        template = self.template()
        return float(np.linalg.norm(template[1] - template[0]))


# The default: 28 px between the eyes in 64 px, the eyes at 29%. It is the largest framing that
# stays inside UTKFace's own 200 px crops (which end just above the eyebrows and at the chin):
# of 599 UTKFace faces, 0.10% of the crop's pixels lie outside the source on average and 1.2%
# of faces have more than 1% outside (README, "Framing").
DEFAULT_FRAMING = Framing(scale=1.4, eye_height=0.29)
# The framing of models trained before framings were recorded: 18 px between the eyes, with the
# forehead, the chin and the background around the face, 44% of it outside UTKFace's crops.
LEGACY_FRAMING = Framing(scale=0.9, eye_height=0.38)
TEMPLATE = DEFAULT_FRAMING.template()  # (5, 2), fractions of the crop side
# Warp at this multiple of the output size, then shrink with area averaging: a direct warp of
# a large face down to 64 px would alias. It puts pixel j of the face at crop coordinate
# j + CROP_SHIFT; face_pixels_to_crop is the one place that accounts for it.
SUPERSAMPLE = 4
CROP_SHIFT = (SUPERSAMPLE - 1) / (2 * SUPERSAMPLE)
# MTCNN runs on a copy whose longer side is at most this (its time grows with the pixels);
# the face is then cut from the full-size photo.
DETECT_SIDE = 1280
# It looks first on a smaller copy, at most this on its shorter side: MTCNN's smallest face is
# 20 px, so it finds the faces of at least 1/16 of the photo's shorter side there, and only a
# photo without one is searched again down to 20 px of the DETECT_SIDE copy. MTCNN then takes a
# third of the time on a 512 px portrait, and its landmarks move by 0.05 to 0.08 of the eye
# distance on average, little more than a 1 px shift of the photo moves them (README, "Speed").
# UTKFace's 200 px crops are searched at full size either way.
DETECT_SHORT_SIDE = 320


class ImageReadError(ValueError):
    """The input could not be read as an image."""


class FaceNotFoundError(ValueError):
    """No face was found in the image."""


@dataclass
class AlignedFace:
    """One detected face, aligned; `matrix` maps photo pixels to aligned-face pixels."""

    image: Image.Image  # size x size RGB
    matrix: np.ndarray  # (2, 3) similarity transform, photo -> aligned crop
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in the photo
    landmarks: np.ndarray  # (5, 2) in the photo
    probability: float  # MTCNN's face score
    num_faces: int  # faces detected in the photo; the largest one was used


Photo = str | Path | bytes | Image.Image | np.ndarray


class Note(str):
    """What reading or aging a photo changed or assumed, for the user: the text, with a kind
    ("info", or "warning" where the result may not be what the user meant). A str, so that
    notes print, join and compare as their text."""

    kind: str

    def __new__(cls, text: str, kind: str = "info"):
        if kind not in ("info", "warning"):
            raise ValueError(f"a note's kind is 'info' or 'warning', not {kind!r}")
        note = super().__new__(cls, text)
        note.kind = kind
        return note


def read_photo(photo: Photo, name: str | None = None) -> tuple[Image.Image, list[Note]]:
    """A path, encoded bytes, PIL image or HxW[x3|x4] uint8 array -> upright RGB PIL image,
    and notes on what was changed. Files and bytes are refused (ImageReadError) beyond
    PIL.Image.MAX_IMAGE_PIXELS, when truncated or when no decoder reads them."""
    if isinstance(photo, np.ndarray):
        channels_ok = photo.ndim == 2 or (photo.ndim == 3 and photo.shape[2] in (3, 4))
        if photo.dtype != np.uint8 or not channels_ok:
            raise ImageReadError(
                f"expected an HxW or HxWxC uint8 array, got {photo.dtype} {photo.shape}"
            )
        return to_rgb(Image.fromarray(photo)), []
    if isinstance(photo, Image.Image):
        return to_rgb(ImageOps.exif_transpose(photo)), []
    if not isinstance(photo, (str, Path, bytes, bytearray)):
        raise ImageReadError(
            f"expected a path, bytes, PIL image or numpy array, got {type(photo).__name__}"
        )
    if isinstance(photo, (bytes, bytearray)):
        name, source = name or "the photo", io.BytesIO(photo)
    else:
        name, source = name or str(photo), photo
    notes = []
    try:
        with warnings.catch_warnings():  # PIL warns up to 2x its limit; we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(source)  # reads the header only; refuses > 2x the cap itself
        with opened:
            width, height = opened.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                raise ImageReadError(
                    f"cannot read {name}: {width}x{height} is more than the {limit:,} "
                    "pixels allowed (PIL.Image.MAX_IMAGE_PIXELS): a decompression bomb?"
                )
            if getattr(opened, "n_frames", 1) > 1:
                notes.append(
                    Note(f"animated image: the first of {opened.n_frames} frames was used")
                )
            if opened.getexif().get(0x0112, 1) != 1:
                notes.append(Note("turned upright by its EXIF orientation"))
            opened.load()
            image = to_rgb(ImageOps.exif_transpose(opened))  # a copy: `opened` closes
    except (OSError, EOFError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        message = str(error).replace(repr(source), repr(name))  # PIL names a buffer so
        raise ImageReadError(f"cannot read {name}: {message}") from error
    return image, notes


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16-bit and float images are scaled, not clipped to white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        if image.mode.startswith("I;16") or peak > 255:
            top = 65535.0  # 16-bit samples (a 16-bit PNG loads as I;16 or I)
        elif image.mode == "F" and peak <= 1.0:
            top = 1.0  # float images in [0, 1]
        else:
            top = 255.0
        values = np.clip(values / top * 255.0, 0, 255)
        image = Image.fromarray(values.round().astype(np.uint8), mode="L")
    return image if image.mode == "RGB" else image.convert("RGB")


def fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) least-squares similarity transform (rotation, uniform scale, shift, no
    reflection) taking points `source` onto `target`, in closed form."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    zs = (source - source.mean(0)) @ np.array([1, 1j])
    zt = (target - target.mean(0)) @ np.array([1, 1j])
    if np.vdot(zs, zs).real < 1e-6:
        raise FaceNotFoundError("the face landmarks are degenerate")
    c = np.vdot(zs, zt) / np.vdot(zs, zs)  # rotation and scale as one complex number
    linear = np.array([[c.real, -c.imag], [c.imag, c.real]])
    return np.c_[linear, target.mean(0) - linear @ source.mean(0)]


def similarity_matrix(
    landmarks: np.ndarray, size: int, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """Photo -> crop matrix taking the 5 landmarks onto the framing's template * size by least
    squares. All five points count: a robust fit such as LMEDS keeps three of five and lets
    the mouth drift."""
    return fit_similarity(landmarks, framing.template() * size).astype(np.float32)


def warp_face(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Cut the aligned size x size face out of an RGB array with a photo -> crop matrix."""
    big = size * SUPERSAMPLE
    # Edges outside the photo are filled by replicating its border (black bars would teach G
    # black bars); the framing keeps them rare on the training data (outside_share).
    warped = cv2.warpAffine(
        rgb,
        matrix * SUPERSAMPLE,
        (big, big),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)


def face_pixels_to_crop(side: int, size: int = FACE_SIZE) -> np.ndarray:
    """(3, 3) map from pixel indices of a size px aligned face shown at side x side (resized
    about pixel centres, as PIL and cv2 do) to the crop coordinates of `matrix`: the one
    statement of warp_face's geometry, for paste-back and for the FR and age chips."""
    ratio = size / side
    offset = ratio / 2 - 0.5 + CROP_SHIFT
    return np.array([[ratio, 0, offset], [0, ratio, offset], [0, 0, 1]])


def template_pixels(size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING) -> np.ndarray:
    """Where the template's five points fall in a size px face cut by warp_face, in pixel
    indices (pixel i at i, as cv2 counts)."""
    return framing.template() * size - CROP_SHIFT


def face_to_photo(matrix: np.ndarray, side: int) -> np.ndarray:
    """(2, 3) map from pixel indices of the aligned face shown at side px to photo pixels."""
    crop_to_photo = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]]))
    return (crop_to_photo @ face_pixels_to_crop(side))[:2]


def outside_share(matrix: np.ndarray, photo_size: tuple[int, int], size: int = FACE_SIZE):
    """The share of an aligned face's pixels whose source lies outside the photo (width,
    height): what warp_face has to invent by replicating the border."""
    centres = (np.arange(size * SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # crop coordinates
    x, y = np.meshgrid(centres, centres)
    crop_to_photo = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]]))[:2]
    px = crop_to_photo[0, 0] * x + crop_to_photo[0, 1] * y + crop_to_photo[0, 2]
    py = crop_to_photo[1, 0] * x + crop_to_photo[1, 1] * y + crop_to_photo[1, 2]
    width, height = photo_size
    outside = (px < -0.5) | (px > width - 0.5) | (py < -0.5) | (py > height - 0.5)
    return float(outside.mean())


class FaceAligner:
    """MTCNN (weights ship in the facenet-pytorch wheel) plus the template alignment."""

    def __init__(
        self,
        size: int = FACE_SIZE,
        device: str | torch.device = "cpu",
        framing: Framing = DEFAULT_FRAMING,
    ):
        from facenet_pytorch import MTCNN  # imported here: it is slow to import

        self.size, self.framing = size, framing
        self.detect_side, self.detect_short_side = DETECT_SIDE, DETECT_SHORT_SIDE
        self.mtcnn = MTCNN(keep_all=True, device=torch.device(device))
        if torch.device(device).type == "cpu":
            # The same numbers (to 1e-4 px), 0.7x the time: PyTorch's max pooling on one CPU
            # thread is several times faster on channels-last tensors, which the convolutions
            # give out once their weights are channels-last.
            self.mtcnn.to(memory_format=torch.channels_last)

    def __call__(self, photo: Photo) -> AlignedFace:
        """The largest face of the photo, aligned; FaceNotFoundError when there is none.

        Detection runs on a copy whose shorter side is at most detect_short_side (and longer
        side at most detect_side), which finds faces down to a share of the photo (1/16 by
        default); a photo where it finds none is searched again on a copy whose longer side is
        at most detect_side. num_faces counts the faces of the search that found one. The face
        is cut from the full-size photo, and box, landmarks and matrix are in full-size pixels.
        """
        image, _ = read_photo(photo)
        if min(image.size) < self.mtcnn.min_face_size:
            raise FaceNotFoundError(
                f"no face found: the image ({image.width}x{image.height} px) "
                f"is smaller than the smallest detectable face "
                f"({self.mtcnn.min_face_size} px)"
            )
        full = min(1.0, self.detect_side / max(image.size))
        shrink = min(full, self.detect_short_side / min(image.size))
        try:
            found = self._detect(shrunk(image, shrink))
        except FaceNotFoundError:
            if shrink == full:
                raise
            shrink = full  # no large face: look for small ones
            found = self._detect(shrunk(image, shrink))
        box, probability, points, num_faces = found
        landmarks = points / shrink
        matrix = similarity_matrix(landmarks, self.size, self.framing)
        face = warp_face(np.asarray(image), matrix, self.size)
        return AlignedFace(
            image=Image.fromarray(face),
            matrix=matrix,
            box=tuple(float(v) / shrink for v in box),
            landmarks=landmarks,
            probability=probability,
            num_faces=num_faces,
        )

    def _detect(self, rgb: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, int]:
        """The largest face's box, score and landmarks, and how many faces there were.

        facenet-pytorch's later stages crop a box clipped to the image and stretch it to the
        box's full size, so a face that reaches the border (a tight crop such as UTKFace's, a
        close selfie) gets landmarks pushed outwards, up to a quarter of the face. When the
        face's box leaves the image, it is detected again on a copy padded with black until
        the box fits, as the original MTCNN pads.
        """
        boxes, probs, points = self._run(rgb)
        best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        height, width = rgb.shape[:2]
        x1, y1, x2, y2 = boxes[best]
        side = max(x2 - x1, y2 - y1)  # MTCNN squares its boxes before the later stages
        overshoot = max(0.0, -x1, -y1, x2 - width, y2 - height) + 0.1 * side
        if overshoot > 0.1 * side + 1:
            pad = int(np.ceil(overshoot))
            padded = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
            try:
                boxes, probs, points = self._run(padded)
            except FaceNotFoundError:  # the black border can hide a face MTCNN saw without it
                return boxes[best], float(probs[best]), points[best], len(boxes)
            boxes, points = boxes - [pad, pad, pad, pad], points - pad
            best = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
        return boxes[best], float(probs[best]), points[best], len(boxes)

    def _run(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with torch.inference_mode():
            boxes, probs, points = self.mtcnn.detect(rgb, landmarks=True)
        if boxes is None or len(boxes) == 0:
            raise FaceNotFoundError("no face found in the image")
        # MTCNN returns object arrays; cast before doing arithmetic on them.
        as_float = [np.asarray(v, dtype=np.float32) for v in (boxes, probs, points)]
        return as_float[0][:, :4], as_float[1], as_float[2]


def shrunk(image: Image.Image, shrink: float) -> np.ndarray:
    """The photo as an RGB array, shrunk by `shrink` (at most 1) with box averaging."""
    if shrink < 1.0:
        size = (round(image.width * shrink), round(image.height * shrink))
        image = image.resize(size, Image.Resampling.BOX)
    return np.asarray(image)


@lru_cache(maxsize=2)
def default_aligner(framing: Framing = DEFAULT_FRAMING) -> FaceAligner:
    """One CPU aligner per process and framing, built on first use."""
    return FaceAligner(framing=framing)


def align_face(photo: Photo) -> Image.Image:
    """The largest face of a photo as an aligned 64x64 RGB PIL image.

    Raises ImageReadError when the photo cannot be read and FaceNotFoundError when it holds
    no face.
    """
    return default_aligner()(photo).image
