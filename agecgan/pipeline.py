"""The aging pipeline: photo -> aligned face -> z -> six aged faces, pasted back into the photo."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS, age_to_bucket, one_hot
from agecgan.align import (
    DEFAULT_FRAMING,
    FACE_SIZE,
    FaceAligner,
    Framing,
    Note,
    Photo,
    default_aligner,
    face_to_photo,
    read_photo,
)
from agecgan.checkpoints import load_network
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, optimize_latent
from agecgan.networks import to_model_range, to_uint8
from agecgan.runtime import select_device

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints"
# No age estimator ships, and D is no age classifier (it scores "a real face of age y" and was
# trained to be fooled), so without the user's age we assume the commonest training bucket:
# 19-29 holds 7,419 of UTKFace's 23,624 faces.
DEFAULT_INPUT_BUCKET = 1
IDENTITY_STEPS = DEFAULT_STEPS  # 1.4 s on one CPU core: what an app can ask a user to wait
# Paste-back mask: an ellipse over the face, its centre MASK_DROP eye distances below the eyes
# and its half-axes MASK_AXES eye distances (capped to stay inside the crop), opaque inside
# FEATHER of its radius and fading smoothly to 0 at its rim.
MASK_DROP, MASK_AXES, FEATHER = 0.53, (1.34, 1.59), 0.35


def mask_ellipse(framing: Framing) -> tuple[tuple[float, float], tuple[float, float]]:
    """(centre, half-axes) of the paste-back ellipse in crop fractions, for a framing."""
    eye_distance = framing.eye_distance
    centre_y = framing.eye_height + MASK_DROP * eye_distance
    room = min(0.48, centre_y - 0.02, 0.98 - centre_y)  # the fade must end inside the crop
    axes = (min(MASK_AXES[0] * eye_distance, room), min(MASK_AXES[1] * eye_distance, room))
    return (0.5, centre_y), axes


@dataclass
class AgingResult:
    """One photo aged; images are RGB PIL images, faces at output_size (aligned: 64x64)."""

    photo: Image.Image  # the input, upright RGB, full size
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 of the face used, in the photo
    matrix: np.ndarray  # (2, 3) photo -> 64 px aligned crop
    aligned: Image.Image  # the 64x64 face the encoder saw
    z: torch.Tensor  # (1, z_dim) latent used, on the CPU
    input_bucket: int  # bucket of the input face (given, or DEFAULT_INPUT_BUCKET)
    num_faces: int  # faces detected; the largest was used
    output_size: int
    grayscale: bool  # a gray photo gets gray faces
    reconstruction: Image.Image  # G(z, y_input)
    aged: list[Image.Image]  # six faces, youngest bucket first
    pasted: list[Image.Image]  # the same six faces in the photo
    notes: list[Note]  # what the pipeline assumed or changed, for the user


def shrink_to(image: Image.Image, side: int, notes: list[Note]) -> Image.Image:
    """The photo with its longer side at most `side` px (Lanczos), noting it when it shrank:
    what the apps do to an upload before aging it, to bound time and memory."""
    if max(image.size) <= side:
        return image
    original = image.size
    image = image.copy()
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    sizes = f"{original[0]}x{original[1]} to {image.width}x{image.height}"
    notes.append(Note(f"large photo: shrunk from {sizes} px"))
    return image


def is_gray(image: Image.Image) -> bool:
    rgb = np.asarray(image)
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())


def age_weights(position: float) -> np.ndarray:
    """A continuous age in bucket units (0 = 0-18 ... 5 = 60+; 2.5 = halfway between 30-39 and
    40-49) -> the six condition weights, linear between the two neighbouring buckets."""
    position = float(np.clip(position, 0, NUM_BUCKETS - 1))
    low = min(int(position), NUM_BUCKETS - 2)
    weights = np.zeros(NUM_BUCKETS)
    weights[low], weights[low + 1] = low + 1 - position, position - low
    return weights


def _check_weights(weights: Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
    if w.shape != (NUM_BUCKETS,) or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be {NUM_BUCKETS} non-negative numbers, not all 0")
    return w / w.sum()


def paste_face(
    photo: np.ndarray, face: np.ndarray, matrix: np.ndarray, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """Warp a 64 px aligned face back into the photo (HxWx3 uint8) with the inverse of the
    photo -> crop matrix, through a feathered ellipse: pixels outside it are left untouched."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # crop px per photo px
    side = int(np.clip(round(FACE_SIZE / scale), FACE_SIZE, 2048))  # about the face's size
    # Lanczos up to the face's size in the photo, so the warp itself hardly resamples.
    big = np.asarray(Image.fromarray(face).resize((side, side), Image.Resampling.LANCZOS))
    to_photo = face_to_photo(matrix, side)
    corners = np.array([[0, 0, 1], [side, 0, 1], [0, side, 1], [side, side, 1]]) @ to_photo.T
    height, width = photo.shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int), [width, height])
    if x1 <= x0 or y1 <= y0:
        return photo.copy()
    grid = (np.arange(side) + 0.5) / side
    centre, axes = mask_ellipse(framing)
    r = np.hypot((grid[None, :] - centre[0]) / axes[0], (grid[:, None] - centre[1]) / axes[1])
    t = np.clip((1 - r) / FEATHER, 0, 1)
    alpha = t * t * (3 - 2 * t)  # smoothstep: no visible edge where the fade starts or ends
    layer = np.dstack([big.astype(np.float32), alpha.astype(np.float32)])
    to_roi = to_photo - [[0, 0, x0], [0, 0, y0]]
    warped = cv2.warpAffine(layer, to_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    out = photo.copy()
    roi = out[y0:y1, x0:x1].astype(np.float32)
    blend = roi + warped[..., 3:] * (warped[..., :3] - roi)  # exactly roi where alpha is 0
    out[y0:y1, x0:x1] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


class AgingPipeline:
    """E, G and MTCNN (FR joins lazily for identity optimization): call it on a photo.

    >>> pipeline = AgingPipeline.from_pretrained("runs/encoder/model")
    >>> result = pipeline("photo.jpg", input_age=34)
    >>> result.aged[5].save("at_60.png"); result.pasted[5].save("me_at_60.jpg")
    >>> face, photo = pipeline.render(result, age_weights(2.5))  # between 30-39 and 40-49
    """

    def __init__(
        self,
        encoder: nn.Module,
        generator: nn.Module,
        aligner: FaceAligner | None = None,
        device: str | torch.device = "cpu",
    ):
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device).eval()
        self.generator = generator.to(self.device).eval()
        self.framing = Framing(*generator.config.framing)  # how G's faces are cut
        if aligner is None:  # on the CPU, share the process-wide MTCNN with align_face
            cpu = self.device.type == "cpu"
            framing = self.framing
            aligner = (
                default_aligner(framing) if cpu else FaceAligner(device=device, framing=framing)
            )
        self.aligner = aligner
        self._recognizer = None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto"):
        """Load E and G, strictly, from a local model folder (default: the shipped checkpoints/)."""
        folder = Path(DEFAULT_MODEL if path is None else path)
        needed = ("config.json", "encoder.safetensors", "generator.safetensors")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing and path is None:
            raise FileNotFoundError(
                f"the shipped Age-cGAN model is missing ({folder} lacks {', '.join(missing)}): "
                "restore it (git checkout checkpoints), or train one (python train.py gan ..., "
                "then python train.py encoder ...; see the README) and pass its model folder "
                "(e.g. runs/encoder/model) as path, or --model"
            )
        if missing:
            raise FileNotFoundError(
                f"{folder} is not a model folder (a local folder; nothing is downloaded): "
                f"missing {', '.join(missing)}"
            )
        device = select_device(device)  # "auto": the GPU when torch sees one
        encoder = load_network(folder, "encoder", device)
        return cls(encoder, load_network(folder, "generator", device), device=device)

    @property
    def recognizer(self):
        """FR, loaded on first use: only identity optimization needs it."""
        if self._recognizer is None:
            from agecgan.face_recognition import FaceRecognizer

            self._recognizer = FaceRecognizer.from_pretrained(framing=self.framing)
            self._recognizer = self._recognizer.to(self.device)
        return self._recognizer

    def __call__(
        self,
        photo: Photo,
        *,
        input_age: int | None = None,
        optimize_identity: bool = True,
        identity_steps: int = IDENTITY_STEPS,
        progress: Callable[[int, int, float], None] | None = None,
        output_size: int = 256,
        faces_from: Callable | None = None,
    ) -> AgingResult:
        """Age the largest face of a photo (path, PIL image or HxW[xC] uint8 array).

        input_age: the person's age in years, which picks the bucket of the reconstruction and
        of identity optimization; None assumes DEFAULT_INPUT_BUCKET (19-29) and says so in
        notes. progress(step, steps, loss) follows identity optimization. faces_from, if given,
        runs in place of self.faces_from (same arguments and results): an app's GPU worker.
        Raises ImageReadError or FaceNotFoundError (both ValueErrors) with a message for the user.
        """
        image, notes = read_photo(photo)
        face = self.aligner(image)
        if face.num_faces > 1:
            box = ", ".join(f"{v:.0f}" for v in face.box)
            text = f"{face.num_faces} faces found; the largest (box {box}) was used"
            notes.append(Note(text, "warning"))  # perhaps not the face the user meant
        if input_age is None:
            bucket = DEFAULT_INPUT_BUCKET
            notes.append(Note(f"input age not given: assumed {BUCKET_LABELS[bucket]}"))
        else:
            bucket = age_to_bucket(input_age)
        grayscale = is_gray(image)
        if grayscale:
            notes.append(Note("grayscale photo: the faces are shown in grayscale too"))
        steps = identity_steps if optimize_identity else 0
        run = faces_from or self.faces_from
        z, faces = run(np.array(face.image), bucket, grayscale, steps, progress)
        rgb = np.asarray(image)
        return AgingResult(
            photo=image,
            box=face.box,
            matrix=face.matrix,
            aligned=face.image,
            z=z,
            input_bucket=bucket,
            num_faces=face.num_faces,
            output_size=output_size,
            grayscale=grayscale,
            reconstruction=_display(faces[0], output_size),
            aged=[_display(f, output_size) for f in faces[1:]],
            pasted=[
                Image.fromarray(paste_face(rgb, f, face.matrix, self.framing)) for f in faces[1:]
            ],
            notes=notes,
        )

    def faces_from(
        self,
        face: np.ndarray,
        bucket: int,
        grayscale: bool,
        identity_steps: int,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray]:
        """The GPU-heavy part of a call: an aligned 64x64x3 uint8 face -> z = E(x), refined by
        identity_steps of identity optimization, and G(z, y) for the input bucket and the six
        buckets: z (1, z_dim) on the CPU and (7, 64, 64, 3) uint8 faces."""
        x = to_model_range(torch.from_numpy(face)[None]).to(self.device)
        y = one_hot(torch.tensor([bucket])).to(self.device)
        with torch.inference_mode():
            z0 = self.encoder(x)
        z = z0.clone()  # a normal tensor: z may need gradients below
        if identity_steps > 0:
            z = optimize_latent(
                self.generator,
                x,
                y,
                z0=z,
                FR=self.recognizer,
                steps=identity_steps,
                lr=DEFAULT_LR,
                progress=progress,
            ).z
        z = z.detach().cpu()
        conditions = torch.cat([y.cpu(), torch.eye(NUM_BUCKETS)])
        return z, self._generate(z, conditions, grayscale)

    def render(self, result: AgingResult, weights: Sequence[float]):
        """The face and pasted photo for any mix of the six age conditions (a continuous age):
        weights are 6 non-negative numbers, normalized to sum 1. Returns (face, photo)."""
        face = self._generate(result.z, _check_weights(weights)[None], result.grayscale)[0]
        return _display(face, result.output_size), _paste(result, face, self.framing)

    def progression(self, result: AgingResult, frames: int = 30, pasted: bool = False):
        """Frames sweeping from the youngest bucket to the oldest, the condition interpolated
        between neighbouring buckets: faces at output_size, or whole photos when pasted."""
        positions = np.linspace(0, NUM_BUCKETS - 1, frames)
        conditions = torch.stack([_check_weights(age_weights(p)) for p in positions])
        faces = self._generate(result.z, conditions, result.grayscale)
        if pasted:
            return [_paste(result, face, self.framing) for face in faces]
        return [_display(face, result.output_size) for face in faces]

    def _generate(self, z: torch.Tensor, y: torch.Tensor, grayscale: bool) -> np.ndarray:
        """G(z, y) for each row of y -> (N, 64, 64, 3) uint8."""
        with torch.inference_mode():
            z = z.to(self.device).expand(len(y), -1)
            faces = to_uint8(self.generator(z, y.to(self.device))).cpu().numpy()
        if grayscale:
            gray = np.rint(faces @ np.array([0.299, 0.587, 0.114]))  # ITU-R 601, as PIL's "L"
            faces = np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)
        return faces


def _display(face: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(face).resize((size, size), Image.Resampling.LANCZOS)


def _paste(result: AgingResult, face: np.ndarray, framing: Framing) -> Image.Image:
    return Image.fromarray(paste_face(np.asarray(result.photo), face, result.matrix, framing))


def save_gif(frames: list[Image.Image], path, frame_ms: int = 80):
    """An animated GIF of a progression, forth and back: the loop never jumps old to young.
    path: a file path (returned as a Path) or a binary file object, such as io.BytesIO."""
    frames = frames + frames[-2:0:-1]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)
    return path if hasattr(path, "write") else Path(path)


def grid_image(result: AgingResult) -> Image.Image:
    """One labelled row: the aligned input, its reconstruction, then the six ages."""
    tiles = [result.aligned.resize(result.reconstruction.size, Image.Resampling.LANCZOS)]
    tiles += [result.reconstruction, *result.aged]
    labels = ["input", f"reconstruction ({BUCKET_LABELS[result.input_bucket]})", *BUCKET_LABELS]
    size, band = result.output_size, max(14, result.output_size // 10)
    grid = Image.new("RGB", (size * len(tiles), size + band), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=band * 0.7)
    for index, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        grid.paste(tile, (index * size, band))
        draw.text((index * size + size / 2, band / 2), label, fill="black", font=font, anchor="mm")
    return grid
