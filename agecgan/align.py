"""Face detection (MTCNN) and alignment onto one fixed 64x64 template.

Training crops and user photos go through the same function, so the networks always see faces
placed the same way: a similarity transform maps MTCNN's five landmarks (eyes, nose, mouth
corners) onto TEMPLATE, which leaves the whole face, the chin and some hair inside the crop.
"""

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
# That crop cuts off the chin and the forehead. Ours shrinks it by TEMPLATE_SCALE about the
# eyes and puts them at TEMPLATE_EYE_HEIGHT: the eyes 18 px apart in a 64 px crop, the whole
# face, the chin and some hair inside. (UTKFace's own crops end just above the eyebrows, so on
# its faces the forehead above that is filled by the border replication of warp_face.)
TEMPLATE_SCALE = 0.9
TEMPLATE_EYE_HEIGHT = 0.38


def _template() -> np.ndarray:
    points = _RECOGNITION_TEMPLATE_112 / 112.0
    eyes = points[:2].mean(axis=0)
    return (points - eyes) * TEMPLATE_SCALE + np.array([0.5, TEMPLATE_EYE_HEIGHT], np.float32)


TEMPLATE = _template()  # (5, 2), fractions of the crop side
# Warp at this multiple of the output size, then shrink with area averaging: a direct warp of
# a large face down to 64 px would alias.
SUPERSAMPLE = 4


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


def load_image(photo: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """A path, PIL image or HxW[x3|x4] uint8 array -> upright RGB PIL image."""
    if isinstance(photo, np.ndarray):
        channels_ok = photo.ndim == 2 or (photo.ndim == 3 and photo.shape[2] in (3, 4))
        if photo.dtype != np.uint8 or not channels_ok:
            raise ImageReadError(
                f"expected an HxW or HxWxC uint8 array, got {photo.dtype} {photo.shape}"
            )
        photo = Image.fromarray(photo)
    elif isinstance(photo, (str, Path)):
        try:
            with Image.open(photo) as opened:
                opened.load()
                photo = opened.copy() if opened.mode == "RGB" else opened
                photo = ImageOps.exif_transpose(photo)
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            raise ImageReadError(f"cannot read {photo}: {error}") from error
    elif not isinstance(photo, Image.Image):
        raise ImageReadError(f"expected a path, PIL image or numpy array, got {type(photo)}")
    else:
        photo = ImageOps.exif_transpose(photo)
    return to_rgb(photo)


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


def similarity_matrix(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Photo -> crop matrix taking the 5 landmarks onto TEMPLATE * size by least squares. All
    five points count: a robust fit such as LMEDS keeps three of five and lets the mouth drift."""
    return fit_similarity(landmarks, TEMPLATE * size).astype(np.float32)


def warp_face(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Cut the aligned size x size face out of an RGB array with a photo -> crop matrix."""
    big = size * SUPERSAMPLE
    # Edges outside the photo are filled by replicating its border: black bars would teach G
    # black bars, and UTKFace's tight crops often end at the chin or ears.
    warped = cv2.warpAffine(
        rgb,
        matrix * SUPERSAMPLE,
        (big, big),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return cv2.resize(warped, (size, size), interpolation=cv2.INTER_AREA)


class FaceAligner:
    """MTCNN (weights ship in the facenet-pytorch wheel) plus the template alignment."""

    def __init__(self, size: int = FACE_SIZE, device: str | torch.device = "cpu"):
        from facenet_pytorch import MTCNN  # imported here: it is slow to import

        self.size = size
        self.mtcnn = MTCNN(keep_all=True, device=torch.device(device))

    def __call__(self, photo: str | Path | Image.Image | np.ndarray) -> AlignedFace:
        """The largest face of the photo, aligned; FaceNotFoundError when there is none."""
        image = load_image(photo)
        if min(image.size) < self.mtcnn.min_face_size:
            raise FaceNotFoundError(
                f"no face found: the image ({image.width}x{image.height} px) "
                f"is smaller than the smallest detectable face "
                f"({self.mtcnn.min_face_size} px)"
            )
        rgb = np.asarray(image)
        with torch.inference_mode():
            boxes, probs, points = self.mtcnn.detect(rgb, landmarks=True)
        if boxes is None or len(boxes) == 0:
            raise FaceNotFoundError("no face found in the image")
        # MTCNN returns object arrays; cast before doing arithmetic on them.
        boxes = np.asarray(boxes, dtype=np.float32)
        points = np.asarray(points, dtype=np.float32)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        best = int(np.argmax(areas))
        matrix = similarity_matrix(points[best], self.size)
        face = warp_face(rgb, matrix, self.size)
        return AlignedFace(
            image=Image.fromarray(face),
            matrix=matrix,
            box=tuple(float(v) for v in boxes[best]),
            landmarks=points[best],
            probability=float(np.asarray(probs, dtype=np.float32)[best]),
            num_faces=len(boxes),
        )


@lru_cache(maxsize=1)
def default_aligner() -> FaceAligner:
    """One CPU aligner per process, built on first use."""
    return FaceAligner()


def align_face(photo: str | Path | Image.Image | np.ndarray) -> Image.Image:
    """The largest face of a photo as an aligned 64x64 RGB PIL image.

    Raises ImageReadError when the photo cannot be read and FaceNotFoundError when it holds
    no face.
    """
    return default_aligner()(photo).image
