"""The aging pipeline: photo -> aligned face -> z -> six aged faces, pasted back into the photo."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from agecgan.adapt import DEFAULT_ADAPT_STEPS, Adaptation, adapt_generator, generate
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
from agecgan.checkpoints import CONFIG_NAME, load_network, missing_shipped, shipped
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, optimize_latent
from agecgan.networks import to_model_range
from agecgan.runtime import select_device

DEFAULT_MODEL = shipped(f"checkpoints/{CONFIG_NAME}").parent  # the checkout's, else the install's
# Without the user's age, the shipped age estimator reads it from the photo, as dlib cuts its chip.
IDENTITY_STEPS = DEFAULT_STEPS  # 1.4 s on one CPU core: what an app can ask a user to wait
# "both": dlib FR plus a pixel term (agecgan.identity), which MobileFace preferred to the paper's
# FR alone on the shipped model (README, "Likeness").
IDENTITY_OBJECTIVE = "both"
# How the aged faces are drawn. "generated": G's own faces, G(z, y_k). "detail": the photo's own
# face plus G's change, x + (G(z, y_k) - G(z, y_x)), so the face keeps its pixels and only the
# change is drawn by G. In both, strength scales the change: 1 is G's, 0 none.
RENDERS = ("generated", "detail")
DEFAULT_RENDER = "detail"  # chosen by "both at once" (README, "Likeness")
DEFAULT_STRENGTH = 1.25  # the shipped G's age change is small: 1.25 won "both at once"
MAX_STRENGTH = 3.0
MAX_ADAPT_STEPS = 200
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's "L"
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
    input_bucket: int  # bucket of the input face (given, or estimated from the photo)
    num_faces: int  # faces detected; the largest was used
    output_size: int
    grayscale: bool  # a gray photo gets gray faces
    reconstruction: Image.Image  # G(z, y_input)
    aged: list[Image.Image]  # six faces, youngest bucket first
    pasted: list[Image.Image]  # the same six faces in the photo
    notes: list[Note]  # what the pipeline assumed or changed, for the user
    render: str = DEFAULT_RENDER  # how the faces were drawn: render() and progression() follow
    strength: float = DEFAULT_STRENGTH
    adaptation: Adaptation | None = None  # G tuned to this photo (adapt_steps > 0)
    input_age: float | None = None  # the age typed, or the one estimated from the photo


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


def face_side(matrix: np.ndarray) -> int:
    """About the size in photo pixels of the 64 px crop that `matrix` cuts."""
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # crop px per photo px
    return int(np.clip(round(FACE_SIZE / scale), FACE_SIZE, 2048))


def _warp_into_photo(big: np.ndarray, matrix: np.ndarray, photo_shape: tuple, framing: Framing):
    """An aligned layer already enlarged to face_side(matrix) (side x side x C float32), warped
    back with the inverse of the photo -> crop matrix: the photo region it covers, the layer
    there and the feathered ellipse's opacity (h x w x 1); None when it misses the photo."""
    side = big.shape[0]
    to_photo = face_to_photo(matrix, side)
    corners = np.array([[0, 0, 1], [side, 0, 1], [0, side, 1], [side, side, 1]]) @ to_photo.T
    height, width = photo_shape[:2]
    x0, y0 = np.maximum(np.floor(corners.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(corners.max(0)).astype(int), [width, height])
    if x1 <= x0 or y1 <= y0:
        return None
    grid = (np.arange(side) + 0.5) / side
    centre, axes = mask_ellipse(framing)
    r = np.hypot((grid[None, :] - centre[0]) / axes[0], (grid[:, None] - centre[1]) / axes[1])
    t = np.clip((1 - r) / FEATHER, 0, 1)
    alpha = t * t * (3 - 2 * t)  # smoothstep: no visible edge where the fade starts or ends
    layer = np.dstack([big, alpha.astype(np.float32)])
    to_roi = to_photo - [[0, 0, x0], [0, 0, y0]]
    warped = cv2.warpAffine(layer, to_roi, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    return (slice(y0, y1), slice(x0, x1)), warped[..., :-1], warped[..., -1:]


def paste_face(
    photo: np.ndarray, face: np.ndarray, matrix: np.ndarray, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """Warp a 64 px aligned face back into the photo (HxWx3 uint8) with the inverse of the
    photo -> crop matrix, through a feathered ellipse: pixels outside it are left untouched."""
    side = face_side(matrix)
    # Lanczos up to the face's size in the photo, so the warp itself hardly resamples.
    big = np.asarray(Image.fromarray(face).resize((side, side), Image.Resampling.LANCZOS))
    warped = _warp_into_photo(big.astype(np.float32), matrix, photo.shape, framing)
    if warped is None:
        return photo.copy()
    region, pixels, alpha = warped
    out = photo.copy()
    roi = out[region].astype(np.float32)
    blend = roi + alpha * (pixels - roi)  # exactly roi where alpha is 0
    out[region] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
    return out


def paste_change(
    photo: np.ndarray, change: np.ndarray, matrix: np.ndarray, framing: Framing = DEFAULT_FRAMING
) -> np.ndarray:
    """Add a 64 px aligned change (64x64x3 float, in pixel levels, signed) to the photo through
    the same feathered ellipse, enlarged smoothly: the photo keeps its own resolution and only
    G's change is drawn at 64 px detail."""
    side = face_side(matrix)
    big = cv2.resize(change.astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    warped = _warp_into_photo(big, matrix, photo.shape, framing)
    if warped is None:
        return photo.copy()
    region, pixels, alpha = warped
    out = photo.copy()
    blend = out[region].astype(np.float32) + alpha * pixels
    out[region] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
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
        self._age_estimator = None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "auto"):
        """Load E and G, strictly, from a local model folder (default: the shipped checkpoints/)."""
        folder = Path(DEFAULT_MODEL if path is None else path)
        needed = ("config.json", "encoder.safetensors", "generator.safetensors")
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing and path is None:
            raise FileNotFoundError(
                f"the shipped Age-cGAN model is missing ({folder} lacks {', '.join(missing)}): "
                f"{missing_shipped(folder, 'checkpoints')}; or train one (python train.py gan "
                "..., then python train.py encoder ...; see the README) and pass its model "
                "folder (e.g. runs/encoder/model) as path, or --model"
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

    @property
    def age_estimator(self):
        """The shipped age estimator, loaded on first use: it reads an untyped input age."""
        if self._age_estimator is None:
            from agecgan.age_estimator import AgeEstimator

            self._age_estimator = AgeEstimator.from_pretrained(framing=self.framing)
        return self._age_estimator

    def __call__(
        self,
        photo: Photo,
        *,
        input_age: int | None = None,
        optimize_identity: bool = True,
        identity_steps: int = IDENTITY_STEPS,
        render: str = DEFAULT_RENDER,
        strength: float = DEFAULT_STRENGTH,
        adapt_steps: int = DEFAULT_ADAPT_STEPS,
        progress: Callable[[int, int, float], None] | None = None,
        output_size: int = 256,
        faces_from: Callable | None = None,
    ) -> AgingResult:
        """Age the largest face of a photo (path, PIL image or HxW[xC] uint8 array).

        input_age: the person's age in years, which picks the bucket of the reconstruction, of
        identity optimization and of adaptation; None estimates it from the photo and says so
        in notes. render: "generated" (G's faces) or "detail" (the photo's face plus G's
        change); strength scales the change (0 to MAX_STRENGTH). adapt_steps > 0 tunes a copy
        of G to this photo first (agecgan.adapt). progress(step, steps, loss) follows identity
        optimization, then adaptation. faces_from, if given, runs in place of self.faces_from
        (same arguments and results): an app's GPU worker. Raises ImageReadError or
        FaceNotFoundError (both ValueErrors) with a message for the user, and ValueError for
        bad options.
        """
        check_render(render, strength, adapt_steps)
        if input_age is not None:
            bucket = age_to_bucket(input_age)  # a bad age fails before any work
        image, notes = read_photo(photo)
        face = self.aligner(image)
        if face.num_faces > 1:
            box = ", ".join(f"{v:.0f}" for v in face.box)
            text = f"{face.num_faces} faces found; the largest (box {box}) was used"
            notes.append(Note(text, "warning"))  # perhaps not the face the user meant
        aligned = np.array(face.image)
        if input_age is None:
            # From a chip cut out of the photo itself, not resampled from the 64 px crop,
            # which holds only two thirds of it (agecgan.age_estimator.cut_age_chip).
            photo_ages = self.age_estimator.photo_ages
            input_age = float(photo_ages(np.asarray(image), face.matrix[None])[0])
            bucket = age_to_bucket(max(1, int(input_age)))  # years completed
            text = (
                f"input age not given: estimated from the photo as about {input_age:.0f} "
                f"({BUCKET_LABELS[bucket]}); type the age to override"
            )
            notes.append(Note(text))
        grayscale = is_gray(image)
        if grayscale:
            notes.append(Note("grayscale photo: the faces are shown in grayscale too"))
        steps = identity_steps if optimize_identity else 0
        run = faces_from or self.faces_from
        z, adaptation, generated = run(aligned, bucket, grayscale, steps, adapt_steps, progress)
        result = AgingResult(
            photo=image,
            box=face.box,
            matrix=face.matrix,
            aligned=face.image,
            z=z,
            input_bucket=bucket,
            num_faces=face.num_faces,
            output_size=output_size,
            grayscale=grayscale,
            reconstruction=face.image,
            aged=[],
            pasted=[],
            notes=notes,
            render=render,
            strength=float(strength),
            adaptation=adaptation,
            input_age=float(input_age),
        )
        faces, changes = self._compose(result, generated)
        result.reconstruction = _display(faces[0], output_size)
        result.aged = [_display(f, output_size) for f in faces[1:]]
        result.pasted = [
            self._paste(result, f, c) for f, c in zip(faces[1:], changes[1:], strict=True)
        ]
        return result

    def faces_from(
        self,
        face: np.ndarray,
        bucket: int,
        grayscale: bool,
        identity_steps: int,
        adapt_steps: int = 0,
        progress: Callable[[int, int, float], None] | None = None,
        *,
        objective: str = IDENTITY_OBJECTIVE,
    ) -> tuple[torch.Tensor, Adaptation | None, np.ndarray]:
        """The GPU-heavy part of a call: an aligned 64x64x3 uint8 face -> z = E(x), refined by
        identity_steps of latent optimization (objective: agecgan.identity's), G tuned to the
        face by adapt_steps, and G's faces for the input bucket and the six buckets: z (1, z_dim)
        on the CPU, the adaptation (None without steps) and (7, 64, 64, 3) float32 faces in
        pixel levels [0, 255]."""
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
                objective=objective,
                steps=identity_steps,
                lr=DEFAULT_LR,
                progress=progress,
            ).z
        adaptation = None
        if adapt_steps > 0:
            adaptation = adapt_generator(
                self.generator,
                x,
                y,
                z.detach(),
                steps=adapt_steps,
                FR=self.recognizer,
                progress=progress,
            )
        z = z.detach().cpu()
        conditions = torch.cat([y.cpu(), torch.eye(NUM_BUCKETS)])
        return z, adaptation, self._generate(z, conditions, adaptation)

    def render(self, result: AgingResult, weights: Sequence[float]):
        """The face and pasted photo for any mix of the six age conditions (a continuous age),
        drawn as the result was (render, strength, adaptation): weights are 6 non-negative
        numbers, normalized to sum 1. Returns (face, photo)."""
        conditions = torch.cat([self._own(result), _check_weights(weights)[None]])
        faces, changes = self._compose(
            result, self._generate(result.z, conditions, result.adaptation)
        )
        return _display(faces[1], result.output_size), self._paste(result, faces[1], changes[1])

    def progression(self, result: AgingResult, frames: int = 30, pasted: bool = False):
        """Frames sweeping from the youngest bucket to the oldest, the condition interpolated
        between neighbouring buckets, drawn as the result was: faces at output_size, or whole
        photos when pasted."""
        positions = np.linspace(0, NUM_BUCKETS - 1, frames)
        sweep = torch.stack([_check_weights(age_weights(p)) for p in positions])
        conditions = torch.cat([self._own(result), sweep])
        faces, changes = self._compose(
            result, self._generate(result.z, conditions, result.adaptation)
        )
        if pasted:
            return [self._paste(result, f, c) for f, c in zip(faces[1:], changes[1:], strict=True)]
        return [_display(face, result.output_size) for face in faces[1:]]

    @staticmethod
    def _own(result: AgingResult) -> torch.Tensor:
        return one_hot(torch.tensor([result.input_bucket])).float()

    def _generate(
        self, z: torch.Tensor, y: torch.Tensor, adaptation: Adaptation | None = None
    ) -> np.ndarray:
        """G(z, y) (or the adapted G's) for each row of y -> (N, 64, 64, 3) float32 in [0, 255]."""
        with torch.inference_mode():
            z = z.to(self.device).expand(len(y), -1)
            faces = generate(self.generator, z, y.to(self.device), adaptation)
            faces = (faces.float().clamp(-1, 1) + 1) * 127.5
        return faces.permute(0, 2, 3, 1).cpu().numpy()

    def _compose(self, result: AgingResult, generated: np.ndarray):
        return compose(generated, result.aligned, result.render, result.strength, result.grayscale)

    def _paste(self, result: AgingResult, face: np.ndarray, change: np.ndarray) -> Image.Image:
        photo = np.asarray(result.photo)
        if result.render == "detail":
            return Image.fromarray(paste_change(photo, change, result.matrix, self.framing))
        return Image.fromarray(paste_face(photo, face, result.matrix, self.framing))


def compose(
    generated: np.ndarray, aligned, render: str, strength: float, grayscale: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """G's faces (N, 64, 64, 3) float pixel levels, row 0 at the input's own bucket, and the
    aligned input -> (faces uint8, changes float): change = strength * (G_k - G_own), each face
    the base plus its change, the base G_own ("generated") or the photo's face ("detail")."""
    changes = strength * (generated - generated[:1])
    base = generated[:1] if render == "generated" else np.asarray(aligned, np.float32)
    if grayscale:
        changes, base = _gray(changes), _gray(base)
    return np.clip(np.rint(base + changes), 0, 255).astype(np.uint8), changes


def check_render(render: str, strength: float, adapt_steps: int) -> None:
    """Refuse bad rendering options with a message a user can act on."""
    if render not in RENDERS:
        raise ValueError(f"render must be one of {', '.join(RENDERS)}, not {render!r}")
    if not (isinstance(strength, (int, float)) and 0 <= strength <= MAX_STRENGTH):
        raise ValueError(f"strength must be a number from 0 to {MAX_STRENGTH:g}, not {strength!r}")
    if isinstance(adapt_steps, bool) or not isinstance(adapt_steps, (int, np.integer)):
        raise ValueError(f"adapt_steps must be a whole number, not {adapt_steps!r}")
    if not 0 <= adapt_steps <= MAX_ADAPT_STEPS:
        raise ValueError(f"adapt_steps must be from 0 to {MAX_ADAPT_STEPS}, not {adapt_steps}")


def _gray(rgb: np.ndarray) -> np.ndarray:
    """RGB (..., 3) -> its luma in all three channels."""
    return np.repeat((rgb @ GRAY_WEIGHTS)[..., None], 3, axis=-1)


def _display(face: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(face).resize((size, size), Image.Resampling.LANCZOS)


def _paste(result: AgingResult, face: np.ndarray, framing: Framing) -> Image.Image:
    return Image.fromarray(paste_face(np.asarray(result.photo), face, result.matrix, framing))


def save_gif(frames: list[Image.Image], path, frame_ms: int = 80):
    """An animated GIF of a progression, forth and back: the loop never jumps old to young.
    path: a file path (returned as a Path) or a binary file object, such as io.BytesIO."""
    # Each frame's palette once, by the fast octree: Pillow's default median cut took 77 ms a
    # frame (4.9 s for the app's 24 frames forth and back, twice the aging itself) against 3 ms,
    # for 2.8 levels of mean error against 1.8.
    frames = [frame.quantize(method=Image.Quantize.FASTOCTREE) for frame in frames]
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
