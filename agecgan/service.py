"""What the apps say and limit, and the one function they call to age a photo (no UI here).

The Gradio app (app/app.py) and the Streamlit page (app/streamlit_app.py) are layout, wiring and
launch over this module: the same limits, the same checks of what a user sends, the same
messages, the same aging and the same progression GIF.
"""

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from agecgan.adapt import DEFAULT_ADAPT_STEPS
from agecgan.ages import NUM_BUCKETS
from agecgan.align import FaceNotFoundError, Note, read_photo
from agecgan.checkpoints import shipped
from agecgan.pipeline import (
    DEFAULT_RENDER,
    DEFAULT_STRENGTH,
    MAX_STRENGTH,
    RENDERS,
    AgingPipeline,
    AgingResult,
    age_weights,
    save_gif,
    shrink_to,
)

EXAMPLES_FOLDER = shipped("app/examples")
EXAMPLES = {  # name -> (file in EXAMPLES_FOLDER, age in years or None); public domain
    "Grace Hopper": ("grace_hopper.jpg", 77),
    "Eileen Collins": ("eileen_collins.jpg", None),
    "The cameraman": ("cameraman.jpg", None),
}
OUTPUT_SIZE = 256  # side of the faces shown: G makes 64 px, Lanczos enlarges them
# Photos are shrunk to this side before anything else: the pasted photos stay sharp on screen,
# and six 50-megapixel copies per user would exhaust memory and take seconds to encode.
MAX_PHOTO_SIDE = 2048
MAX_UPLOAD_MB = 25  # larger files are refused before they are read
MAX_IDENTITY_STEPS = 100  # about 7 s of Adam on the recipe's G on one CPU core
MAX_ADAPT_STEPS = 100  # tuning G to the photo: about 0.1 s a step on one CPU core
MIN_AGE, MAX_AGE = 1, 120  # years
GIF_FRAMES = 24  # youngest to oldest; played forth and back
GIF_FRAME_MS = 80
# A CPU runs one or two agings at a time efficiently; the others wait for a slot.
AGE_CONCURRENCY = 2
# The blend sliders start halfway between 30-39 and 40-49 (a continuous age of 2.5 buckets).
START_POSITION = 2.5

NO_MODEL = (
    "The shipped model is missing from checkpoints/ (restore it with git checkout checkpoints), "
    "or train one with train.py and start the app with --model DIR (or set AGECGAN_MODEL)."
)
NO_PHOTO = "Upload a photo, take one with the webcam, or pick an example first."
NO_WEIGHT = "Set at least one age slider above 0."


class RequestError(ValueError):
    """What a user sent cannot be aged; the message says why, in the user's terms."""


def unreadable_message(detail: str) -> str:
    return f"This file could not be read as a photo: {detail}"


def no_face_message(error: Exception) -> str:
    text = str(error)
    return (
        f"{text[:1].upper()}{text[1:]}. Try a photo where the face is larger, frontal and well lit."
    )


def too_large_message(name: str) -> str:
    return f"{name} is larger than the {MAX_UPLOAD_MB} MB allowed for a photo."


def _number(value) -> float | None:
    """A finite float from what a form or an API call sent, or None (inf, NaN, "abc", [])."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def check_age(value) -> int | None:
    """The person's age in whole years, or None where it was not given (empty, or 0: the Gradio
    number box shows and sends 0 until someone types in it); the pipeline then estimates it."""
    if value is None or value == "" or value == 0:
        return None
    number = _number(value)
    if number is None:
        raise RequestError(f"The age must be a number of years, not {value!r}.")
    age = round(number)
    if not MIN_AGE <= age <= MAX_AGE:
        raise RequestError(f"The age must be between {MIN_AGE} and {MAX_AGE} years, not {value}.")
    return age


def _whole(value, most: int, what: str) -> int:
    number = 0.0 if value is None or value == "" else _number(value)
    if number is None or number != round(number) or not 0 <= number <= most:
        raise RequestError(f"{what} must be between 0 and {most} (a whole number), not {value!r}.")
    return int(number)


def check_steps(value) -> int:
    """Identity-optimization steps, a whole number from 0 to MAX_IDENTITY_STEPS (empty: 0)."""
    return _whole(value, MAX_IDENTITY_STEPS, "Identity steps")


def check_adapt_steps(value) -> int:
    """Steps of tuning G to the photo, a whole number from 0 to MAX_ADAPT_STEPS (empty: 0)."""
    return _whole(value, MAX_ADAPT_STEPS, "Adaptation steps")


def check_render(value) -> str:
    """How the faces are drawn: one of pipeline.RENDERS (empty: the default)."""
    if value is None or value == "":
        return DEFAULT_RENDER
    if value not in RENDERS:
        raise RequestError(f"The drawing must be one of {', '.join(RENDERS)}, not {value!r}.")
    return value


def check_strength(value) -> float:
    """How strongly the age change is drawn: 0 (none) to MAX_STRENGTH (empty: the default)."""
    if value is None or value == "":
        return DEFAULT_STRENGTH
    number = _number(value)
    if number is None or not 0 <= number <= MAX_STRENGTH:
        raise RequestError(
            f"The strength must be a number from 0 to {MAX_STRENGTH:g}, not {value!r}."
        )
    return number


def check_weights(weights: Sequence) -> list[float]:
    """Six age weights, finite and 0 or more, not all 0 (they are normalized to sum 1)."""
    numbers = [_number(w) for w in weights]
    if len(numbers) != NUM_BUCKETS or any(w is None or w < 0 for w in numbers):
        raise RequestError(f"Give {NUM_BUCKETS} age weights, each a number of 0 or more.")
    if not sum(numbers) > 0:
        raise RequestError(NO_WEIGHT)
    return numbers


def check_position(value) -> float:
    """A continuous age in bucket units: 0 (0-18) to NUM_BUCKETS - 1 (60+)."""
    number = _number(value)
    if number is None or not 0 <= number <= NUM_BUCKETS - 1:
        raise RequestError(
            f"The age position must be a number from 0 to {NUM_BUCKETS - 1}, not {value!r}."
        )
    return number


def read_upload(photo: str | Path | bytes, name: str) -> tuple[Image.Image, list[Note]]:
    """A file a user sent (a path, or its bytes) -> upright RGB photo at most MAX_PHOTO_SIDE and
    notes. At most MAX_UPLOAD_MB, and read_photo's strictness (pixel cap against decompression
    bombs, truncation, format); the messages name the file as the user named it."""
    size = len(photo) if isinstance(photo, (bytes, bytearray)) else Path(photo).stat().st_size
    if size > MAX_UPLOAD_MB * 2**20:  # a browser refuses these; a script may not
        raise RequestError(too_large_message(name))
    try:
        image, notes = read_photo(photo, name)
    except Exception as error:  # ImageReadError, or what PIL's decoders raise beyond it
        # (a corrupt TIFF: TypeError): whatever the reason, the user's file is unreadable.
        raise RequestError(unreadable_message(str(error))) from error
    return shrink_to(image, MAX_PHOTO_SIDE, notes), notes


@dataclass
class Aged:
    """One photo aged: the pipeline's result, every note on it, and the progression GIF."""

    result: AgingResult
    notes: list[Note]  # reading's, then aging's
    gif: bytes  # youngest to oldest and back

    def kept(self) -> AgingResult:
        """The result without its twelve images (the apps hold them encoded): what a session
        keeps so that the sliders re-render from z without the encoder."""
        return replace(self.result, aged=[], pasted=[])


def age_photo(
    pipeline: AgingPipeline,
    photo: Image.Image,
    read_notes: list[Note],
    input_age: int | None,
    identity: bool,
    steps: int,
    progress: Callable[[int, int, float], None] | None = None,
    faces_from: Callable | None = None,
    *,
    render: str = DEFAULT_RENDER,
    strength: float = DEFAULT_STRENGTH,
    adapt_steps: int = DEFAULT_ADAPT_STEPS,
) -> Aged:
    """Age the largest face of a photo read by read_upload (input_age, steps, render, strength,
    adapt_steps: as the check_ functions return them). progress(step, steps, loss) follows
    identity optimization, then adaptation; faces_from runs the GPU-heavy part elsewhere
    (AgingPipeline.__call__). Raises RequestError when there is no face."""
    try:
        result = pipeline(
            photo,
            input_age=input_age,
            optimize_identity=identity and steps > 0,
            identity_steps=steps,
            render=render,
            strength=strength,
            adapt_steps=adapt_steps,
            progress=progress,
            output_size=OUTPUT_SIZE,
            faces_from=faces_from,
        )
    except FaceNotFoundError as error:
        raise RequestError(no_face_message(error)) from error
    return Aged(result, list(read_notes) + result.notes, progression_gif(pipeline, result))


def progression_gif(pipeline: AgingPipeline, result: AgingResult) -> bytes:
    """The GIF of GIF_FRAMES faces from the youngest age to the oldest and back."""
    buffer = io.BytesIO()
    save_gif(pipeline.progression(result, frames=GIF_FRAMES), buffer, GIF_FRAME_MS)
    return buffer.getvalue()


def blend(
    pipeline: AgingPipeline, result: AgingResult, weights: Sequence
) -> tuple[Image.Image, Image.Image]:
    """The face and the pasted photo for six age weights (check_weights)."""
    return pipeline.render(result, check_weights(weights))


def sweep(
    pipeline: AgingPipeline, result: AgingResult, position
) -> tuple[Image.Image, Image.Image, list[float]]:
    """The face and the pasted photo at a continuous age (check_position), and the six bucket
    weights it stands for, rounded as the sliders show them."""
    weights = age_weights(check_position(position))
    face, photo = pipeline.render(result, weights)
    return face, photo, [round(float(w), 3) for w in weights]
