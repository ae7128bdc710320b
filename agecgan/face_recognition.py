"""FR: dlib's ResNet face-recognition network (128-d identity embeddings), frozen, in PyTorch.

The network is dlib's dlib_face_recognition_resnet_model_v1 (Davis King, CC0), rebuilt layer by
layer; its weights come from the TF.js port in npm @vladmandic/face-api (see convert_face_api.py
and checkpoints/face_recognition/LICENSE.md). It was trained on faces aligned to dlib's 150x150
chip, so FaceRecognizer warps our 64x64 template crops onto that chip with one fixed,
differentiable affine map before embedding them. Two faces whose embeddings are less than
SAME_PERSON_THRESHOLD apart (Euclidean) are the same person.
"""

from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecgan.align import DEFAULT_FRAMING, FACE_SIZE, Framing, fit_similarity, template_pixels
from agecgan.checkpoints import missing_shipped, shipped

EMBEDDING_SIZE = 128
SAME_PERSON_THRESHOLD = 0.6  # dlib's threshold on the Euclidean distance of two embeddings
CHIP_SIZE = 150  # dlib's network takes 150x150 RGB chips...
CHIP_PADDING = 0.25  # ...cut with get_face_chip_details(size=150, padding=0.25), as in training
# dlib's input layer: (pixel - channel mean) / 256, RGB order, pixels in [0, 255].
DLIB_MEAN_RGB = (122.782, 117.001, 104.298)
DLIB_INPUT_SCALE = 256.0
WEIGHTS = shipped("checkpoints/face_recognition/dlib_resnet_v1.safetensors")

# dlib's 5-point chip template on the unit face square (get_face_chip_details in
# dlib/image_transforms/interpolation.h), in the order of dlib's 5-point shape predictor: outer
# and inner corner of the eye on the image right, outer and inner corner of the eye on the image
# left, base of the nose.
DLIB_TEMPLATE = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# Our TEMPLATE's five points (eye centres, nose tip, mouth corners) on the same unit square,
# taken from dlib's 68-point mean face shape (same file; its eye corners and nose base agree with
# DLIB_TEMPLATE to 0.003): each eye centre is the mean of its six contour points 36-41 / 42-47,
# the nose tip is point 30, the mouth corners are 48 and 54. On the astronaut and Grace Hopper,
# dlib's own landmarks put our aligned points within 5 chip pixels (of 150) of where these do.
# Through this warp our 64 px faces of the test photos keep people apart (same person, mirrored:
# 0.17-0.40; different people: 0.72-0.84); a plain resize to 150 px gave different people 0.61.
TEMPLATE_ON_DLIB_FACE = np.array(
    [
        [0.225492, 0.215990],
        [0.754761, 0.215990],
        [0.490127, 0.515625],
        [0.254149, 0.780233],
        [0.726104, 0.780233],
    ]
)


def chip_points(points: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING):
    """Unit-face-square points -> pixel coordinates on dlib's size x size chip.

    Continuous coordinates in which pixel i spans [i, i + 1): dlib samples chip pixel i at
    about i + 0.5 (chip_matrix has the exact geometry)."""
    return (np.asarray(points, dtype=np.float64) + padding) / (1 + 2 * padding) * size


def chip_matrix(landmarks: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """Photo -> chip (2, 3) matrix for cv2.warpAffine from dlib's 5 landmarks (pixel centres at
    integers, as in dlib and cv2): the geometry of dlib's get_face_chip(size, padding=0.25)."""
    # dlib fits chip -> photo (with poor landmarks not the inverse of a photo -> chip fit), then
    # spans its size pixel centres over a box size * scale - 1 photo pixels wide about the
    # image of the chip's centre.
    fit = fit_similarity(chip_points(DLIB_TEMPLATE, size), landmarks)
    scale = np.hypot(*fit[:, 0])
    linear = fit[:, :2] * (size * scale - 1) / ((size - 1) * scale)
    centre = fit @ np.array([size / 2, size / 2, 1])
    chip_to_photo = np.c_[linear, centre - linear @ np.full(2, (size - 1) / 2)]
    return np.linalg.inv(np.r_[chip_to_photo, [[0, 0, 1]]])[:2]


def template_to_chip_theta(
    face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING
) -> torch.Tensor:
    """affine_grid's (1, 2, 3) theta sampling the 150 px chip from a face_size template crop."""
    crop = template_pixels(face_size, framing) + 0.5  # + 0.5: pixel i spans [i, i + 1) here
    crop_to_chip = np.r_[fit_similarity(crop, chip_points(TEMPLATE_ON_DLIB_FACE)), [[0, 0, 1]]]

    def normalize(size: int) -> np.ndarray:  # pixels [0, size) -> [-1, 1] (align_corners=False)
        return np.array([[2 / size, 0, -1], [0, 2 / size, -1], [0, 0, 1]])

    theta = normalize(face_size) @ np.linalg.inv(crop_to_chip) @ np.linalg.inv(normalize(CHIP_SIZE))
    return torch.tensor(theta[None, :2], dtype=torch.float32)


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between embeddings along the last axis (same person: < 0.6)."""
    return (a - b).norm(dim=-1)


class ScaledConv(nn.Module):
    """dlib's con + affine pair: a convolution with bias, then a per-channel scale and offset."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        # dlib pads stride-1 convolutions to keep the size and does not pad strided ones.
        padding = kernel_size // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)
        # The affine layer is what a batch norm became when dlib froze it after training.
        self.scale = nn.Parameter(torch.ones(out_channels))
        self.offset = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.scale[:, None, None] + self.offset[:, None, None]


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, zero-padding each to the larger channel count, height and width (at the end)."""
    size = [max(p, q) for p, q in zip(a.shape[1:], b.shape[1:], strict=True)]

    def pad(x: torch.Tensor) -> torch.Tensor:
        # F.pad lists (left, right) pairs from the last dimension backwards
        c, h, w = (s - t for s, t in zip(size, x.shape[1:], strict=True))
        return F.pad(x, (0, w, 0, h, 0, c)) if c or h or w else x

    return pad(a) + pad(b)


class ResidualBlock(nn.Module):
    """dlib's ares / ares_down: two 3x3 ScaledConvs plus the input, then ReLU.

    A downsampling block strides its first convolution by 2, and its shortcut is a 2x2 average
    pool. dlib adds tensors of unequal shape by zero-padding (extra channels; and one row and
    column at 8 -> 3 vs 4 and 4 -> 1 vs 2 px), which add_padded reproduces.
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        self.conv1 = ScaledConv(in_channels, out_channels, 3, stride=2 if downsample else 1)
        self.conv2 = ScaledConv(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.avg_pool2d(x, 2) if self.downsample else x
        return F.relu(add_padded(out, shortcut))


# (name, input channels, output channels, downsample), in dlib's order; the names are face-api's.
BLOCKS = (
    ("conv32_1", 32, 32, False),
    ("conv32_2", 32, 32, False),
    ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True),
    ("conv64_1", 64, 64, False),
    ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True),
    ("conv128_1", 128, 128, False),
    ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True),
    ("conv256_1", 256, 256, False),
    ("conv256_2", 256, 256, False),
    ("conv256_down_out", 256, 256, True),
)


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: (N, 3, 150, 150) normalized chips -> (N, 128).

    5,614,592 parameters: a 7x7/2 stem and a 3/2 max pool (150 -> 72 -> 35 px), 14 residual
    blocks (35 -> 17 -> 8 -> 4 -> 2 px), a global mean and a 256 -> 128 linear map, no bias.
    """

    def __init__(self):
        super().__init__()
        self.conv32_down = ScaledConv(3, 32, 7, stride=2)
        self.blocks = nn.Sequential(
            OrderedDict((name, ResidualBlock(i, o, down)) for name, i, o, down in BLOCKS)
        )
        self.fc = nn.Linear(256, EMBEDDING_SIZE, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv32_down(x)), 3, 2)  # (N, 32, 35, 35)
        x = self.blocks(x)  # (N, 256, 2, 2)
        return self.fc(x.mean(dim=(2, 3)))  # (N, 128)


class FrozenModule(nn.Module):
    """A module that is never trained: no trainable parameters, and always in eval mode."""

    def freeze(self) -> "FrozenModule":
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return super().train(False)

    def check_faces(self, faces: torch.Tensor) -> None:
        """Refuse anything but a batch of aligned RGB faces of this module's face_size."""
        expected = (3, self.face_size, self.face_size)
        if faces.ndim != 4 or tuple(faces.shape[1:]) != expected:
            raise ValueError(f"expected faces of shape (N, {expected}), got {tuple(faces.shape)}")

    def train(self, mode: bool = True) -> "FrozenModule":
        # A parent's .train() must not switch FR to training behaviour: it stays as measured.
        return super().train(False)

    def to_chip(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) template faces in [-1, 1] -> the network's chips, pixels in [0, 255],
        sampled on `self.grid` (the chip's place in the crop, computed once)."""
        self.check_faces(faces)
        grid = self.grid.expand(len(faces), -1, -1, -1)
        # The chip reaches past a tight crop: replicate its border, as warp_face does.
        chips = F.grid_sample(faces, grid, "bilinear", "border", align_corners=False)
        return (chips + 1) * 127.5


class FaceRecognizer(FrozenModule):
    """FR: identity embeddings of aligned faces, with dlib's ResNet (frozen, differentiable).

    >>> fr = FaceRecognizer.from_pretrained()  # the weights shipped under checkpoints/
    >>> embeddings = fr(faces)  # (N, 3, 64, 64) in [-1, 1], aligned by agecgan.align -> (N, 128)
    >>> same = distance(embeddings[0], embeddings[1]) < SAME_PERSON_THRESHOLD
    """

    def __init__(self, face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING):
        super().__init__()
        self.face_size, self.framing = face_size, framing
        self.network = DlibResNet()
        # Computed once: the sampling grid of the chip in the template crop.
        grid = F.affine_grid(
            template_to_chip_theta(face_size, framing),
            [1, 3, CHIP_SIZE, CHIP_SIZE],
            align_corners=False,
        )
        self.register_buffer("grid", grid, persistent=False)  # (1, 150, 150, 2)
        mean = torch.tensor(DLIB_MEAN_RGB).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, framing: Framing = DEFAULT_FRAMING
    ) -> "FaceRecognizer":
        """Load converted weights (default: the shipped checkpoint), strictly, and freeze; it
        takes faces cut with `framing`."""
        from safetensors.torch import load_file

        if path is None and not WEIGHTS.is_file():
            where = missing_shipped(WEIGHTS, "checkpoints/face_recognition")
            raise FileNotFoundError(f"the shipped FR weights are missing: {where}")
        model = cls(framing=framing)
        state = load_file(str(WEIGHTS if path is None else path))
        model.network.load_state_dict(state, strict=True)  # float16 files are upcast here
        model.freeze()
        return model

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        """(N, 3, 150, 150) RGB dlib chips, pixels in [0, 255] -> (N, 128) embeddings."""
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected chips of shape (N, 3, 150, 150), got {tuple(chips.shape)}")
        return self.network((chips - self.mean) / DLIB_INPUT_SCALE)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) faces aligned by agecgan.align, in [-1, 1] -> (N, 128) embeddings."""
        return self.embed_chips(self.to_chip(faces))


class InceptionResnetRecognizer(FrozenModule):
    """Optional FR for online machines: facenet-pytorch's InceptionResnetV1, 512-d embeddings.

    Never the default. With weights="vggface2" or "casia-webface", facenet-pytorch DOWNLOADS
    about 107 MB from GitHub releases at construction, which fails offline (those weights are in
    no registry package); weights=None builds it untrained, without downloading. Its embeddings
    are unit-length and SAME_PERSON_THRESHOLD (dlib's) does not apply to them.
    """

    embedding_size = 512

    def __init__(self, weights: str | None = "vggface2", face_size: int = FACE_SIZE):
        super().__init__()
        from facenet_pytorch import InceptionResnetV1  # optional dependency, slow to import

        self.face_size = face_size
        self.network = InceptionResnetV1(pretrained=weights)
        self.freeze()

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) aligned faces in [-1, 1] -> (N, 512) unit-length embeddings."""
        self.check_faces(faces)
        # It was trained on 160 px crops standardized as (pixel - 127.5) / 128.
        faces = F.interpolate(faces, size=160, mode="bilinear", align_corners=False)
        return self.network(faces * (127.5 / 128))
