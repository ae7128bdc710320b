"""The Gradio web app: age a face from a photo or the webcam, blend ages, download the sweep."""

import argparse
import atexit
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python app/app.py` where agecgan is not installed (a Space)
    sys.path.insert(0, str(ROOT))

from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS  # noqa: E402
from agecgan.align import FaceNotFoundError, read_photo  # noqa: E402
from agecgan.pipeline import (  # noqa: E402
    IDENTITY_STEPS,
    AgingPipeline,
    AgingResult,
    age_weights,
    save_gif,
    shrink_to,
)

EXAMPLES = Path(__file__).resolve().parent / "examples"
NO_MODEL = (
    "The shipped model is missing from checkpoints/ (restore it with git checkout checkpoints), "
    "or train one with train.py and start the app with --model DIR (or set AGECGAN_MODEL)."
)
OUTPUT_SIZE = 256  # side of the faces shown: G makes 64 px, Lanczos enlarges them
# Photos are shrunk to this side before anything else: the pasted photos stay sharp on screen,
# and six 50-megapixel copies per user would exhaust memory and take seconds to encode.
MAX_PHOTO_SIDE = 2048
MAX_UPLOAD = "25mb"  # larger files are refused by Gradio before they reach the handler
MAX_IDENTITY_STEPS = 100  # about 7 s of Adam on the recipe's G on one CPU core
GIF_FRAMES = 24  # youngest to oldest; played forth and back
GIF_FRAME_MS = 80
# Results (faces, pasted photos, the GIF) live in Gradio's cache until the sweep: every
# CACHE_SWEEP_S, files older than CACHE_AGE_S go; long enough to view and download them.
CACHE_SWEEP_S, CACHE_AGE_S = 60, 300
SESSION_TTL_S = 1800  # an idle session's aged photo is dropped from memory after this
# A CPU runs one or two agings at a time efficiently; the rest wait in a bounded queue.
AGE_CONCURRENCY, RENDER_CONCURRENCY, QUEUE_SIZE = 2, 4, 64
# The blend sliders start halfway between 30-39 and 40-49 (a continuous age of 2.5 buckets).
START_POSITION = 2.5


@dataclass
class Session:
    """One user's aged photo, kept in gr.State so the sliders re-render without the encoder."""

    result: AgingResult  # aged and pasted emptied: the galleries hold them; render needs z
    source: str  # the uploaded file it came from (deleted once read)
    read_notes: list[str]  # what reading the file changed (EXIF, frames, size)


def age_photo(
    pipeline: AgingPipeline | None,
    photo,
    input_age: float | None,
    identity: bool,
    steps: float,
    session: Session | None = None,
    progress=gr.Progress(),  # noqa: B008 (Gradio's way to ask for a progress bar)
):
    """Age the largest face in a photo (a path, or Gradio's file dict when wired to the UI).

    Returns (path, caption) pairs of the reconstruction and the six aged faces, the same for
    the six pasted photos, the GIF's path, the notes (Markdown) and the new Session. Raises
    gr.Error with a message for the user.
    """
    if pipeline is None:
        raise gr.Error(NO_MODEL)
    path, name = _photo_path(photo)
    age = _input_age(input_age)
    steps = int(steps or 0)
    if not 0 <= steps <= MAX_IDENTITY_STEPS:
        raise gr.Error(f"Identity steps must be between 0 and {MAX_IDENTITY_STEPS}.")
    progress(0, desc="reading the photo")
    if Path(path).is_file():
        image, read_notes = _read_upload(path, name)
    elif session is not None and session.source == path:
        # The upload was deleted after its first run; the photo is still in this session.
        image, read_notes = session.result.photo, session.read_notes
    else:
        raise gr.Error(
            "The photo is no longer on the server (uploads are deleted as soon as they are "
            "read). Please upload it again."
        )
    progress(0, desc="finding the face")
    try:
        result = pipeline(
            image,
            input_age=age,
            optimize_identity=identity and steps > 0,
            identity_steps=steps,
            progress=lambda step, total, loss: progress(
                (step, total), desc=f"preserving identity (loss {loss:.3f})"
            ),
            output_size=OUTPUT_SIZE,
        )
    except FaceNotFoundError as error:
        raise gr.Error(no_face_message(error)) from error
    progress(1, desc="making the progression")
    folder = result_folder()
    gif = save_progression(pipeline.progression(result, frames=GIF_FRAMES), folder)
    reconstruction = f"reconstruction ({BUCKET_LABELS[result.input_bucket]})"
    faces = [(save(result.reconstruction, folder / "reconstruction.png"), reconstruction)]
    pasted = []
    for label, face, whole in zip(BUCKET_LABELS, result.aged, result.pasted, strict=True):
        stem = f"age_{label.replace('+', '_plus')}"  # download names; no '+' in URLs
        faces.append((save(face, folder / f"{stem}.png"), label))
        pasted.append((save(whole, folder / f"photo_{stem}.jpg"), label))
    notes = "\n".join(f"- {note}" for note in read_notes + result.notes)
    kept = replace(result, aged=[], pasted=[])  # six full-size photos per user: not in memory
    return faces, pasted, gif, notes, Session(kept, path, read_notes)


def blend(pipeline: AgingPipeline | None, session: Session | None, *weights: float):
    """The face and pasted photo for six age weights (any non-negative mix, not all 0)."""
    result = _session_result(pipeline, session)
    if len(weights) != NUM_BUCKETS or any(w is None or w < 0 for w in weights):
        raise gr.Error(f"Give {NUM_BUCKETS} age weights of 0 or more.")
    if not sum(weights) > 0:
        raise gr.Error(NO_WEIGHT)
    return _save_render(*pipeline.render(result, weights))


def sweep(pipeline: AgingPipeline | None, session: Session | None, position: float):
    """The face and pasted photo at a continuous age (0 = 0-18 ... 5 = 60+), and the six
    bucket weights it stands for (so that the bucket sliders follow)."""
    result = _session_result(pipeline, session)
    weights = age_weights(position)
    face, photo = _save_render(*pipeline.render(result, weights))
    return face, photo, *(round(float(w), 3) for w in weights)


def result_folder() -> Path:
    """A new folder for one request's results inside Gradio's cache: served from there as they
    are and deleted with the cache. Handing Gradio PIL images instead would store each under
    the hash of its bytes, one file for every user with the same result (say, the same example
    photo), rewritten while another user's download of it streams: truncated images."""
    cache = Path(get_upload_folder())
    cache.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=cache))


def save(image: Image.Image, path: Path) -> str:
    if path.suffix == ".jpg":
        image.save(path, quality=90)  # photos: a tenth of the PNG's size, no visible loss
    else:
        image.save(path)
    return str(path)


def save_progression(frames: list[Image.Image], folder: Path) -> str:
    """The progression as an animated GIF in this request's folder."""
    return str(save_gif(frames, folder / "progression.gif", GIF_FRAME_MS))


def _save_render(face: Image.Image, photo: Image.Image) -> tuple[str, str]:
    folder = result_folder()
    return save(face, folder / "blend.png"), save(photo, folder / "blend.jpg")


def _photo_path(photo) -> tuple[str, str]:
    """The file path and a display name of the photo input."""
    if isinstance(photo, dict):  # Gradio's FileData, passed unprocessed (preprocess=False)
        path, name = photo.get("path"), photo.get("orig_name")
    else:
        path, name = photo, None
    if not path:
        raise gr.Error(NO_PHOTO)
    return str(path), name or Path(path).name


def _input_age(value: float | None) -> int | None:
    # Gradio's number box shows and sends 0 until someone types in it: 0 means "not given".
    if value is None or value == "" or value == 0:
        return None  # the pipeline assumes 19-29 and says so
    try:
        age = round(float(value))
    except (TypeError, ValueError) as error:
        raise gr.Error(f"The age must be a number of years, not {value!r}.") from error
    if not 1 <= age <= 120:
        raise gr.Error(f"The age must be between 1 and 120 years, not {value}.")
    return age


def _read_upload(path: str, name: str) -> tuple[Image.Image, list[str]]:
    """read_photo (strict about size, truncation and format), then shrink a large photo;
    the uploaded file is deleted whatever happens."""
    try:
        image, notes = read_photo(path)
    except Exception as error:  # ImageReadError, or what PIL's decoders raise beyond it
        # (a corrupt TIFF: TypeError): whatever the reason, the user's file is unreadable.
        message = str(error).replace(path, name)  # the server's paths are not the user's
        raise gr.Error(unreadable_message(message)) from error
    finally:
        _delete_upload(path)
    return shrink_to(image, MAX_PHOTO_SIDE, notes), notes


def _delete_upload(path: str) -> None:
    """Delete a file Gradio received from a user (never one of ours, such as an example)."""
    file, uploads = Path(path).resolve(), Path(get_upload_folder()).resolve()
    if not file.is_relative_to(uploads):
        return
    file.unlink(missing_ok=True)
    if file.parent != uploads:  # Gradio keeps each upload in a folder of its own
        with contextlib.suppress(OSError):
            file.parent.rmdir()


def _session_result(pipeline: AgingPipeline | None, session: Session | None) -> AgingResult:
    if pipeline is None:
        raise gr.Error(NO_MODEL)
    if session is None:
        raise gr.Error(
            "Age a photo first (upload one and press Age). An idle session's photo is "
            f"forgotten after {SESSION_TTL_S // 60} minutes."
        )
    return session.result


def _capitalized(error: Exception) -> str:
    text = str(error)
    return text[:1].upper() + text[1:]


# What both apps (this one and app/streamlit_app.py) tell a user.
NO_PHOTO = "Upload a photo, take one with the webcam, or pick an example first."
NO_WEIGHT = "Set at least one age slider above 0."


def unreadable_message(detail: str) -> str:
    return f"This file could not be read as a photo: {detail}"


def no_face_message(error: Exception) -> str:
    return f"{_capitalized(error)}. Try a photo where the face is larger, frontal and well lit."


DESCRIPTION = f"""
# Age-cGAN: one face at every age

Upload a photo (or take one with the webcam): the app finds the largest face, encodes it
into the generator's latent z, and draws that face at six ages, 0-18 to 60+. Then blend
the ages with the sliders, or sweep one continuous age, without encoding again.
Uploads are deleted as soon as they are read; the results are deleted from the server after
{CACHE_AGE_S // 60} minutes.
"""


def build_demo(pipeline: AgingPipeline | None, message: str | None = None) -> gr.Blocks:
    """The UI around a pipeline. Without one the app still serves: the page shows `message`
    (default: NO_MODEL, else why the model folder failed) and every action answers NO_MODEL."""
    if pipeline is None:
        message = message or NO_MODEL
    # Example files are served from app/examples as they are, never copied into the cache,
    # so that the upload folder holds only what users sent (and the handler may delete it).
    gr.set_static_paths([EXAMPLES])
    with gr.Blocks(
        title="Age-cGAN",
        analytics_enabled=False,  # no calls home with what users do
        delete_cache=(CACHE_SWEEP_S, CACHE_AGE_S),
    ) as demo:
        gr.Markdown(DESCRIPTION)
        if message:
            gr.Markdown(f"**{message}**", elem_id="model-message")
        session = gr.State(time_to_live=SESSION_TTL_S)
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.Image(
                    label="Photo",
                    sources=["upload", "webcam"],
                    type="filepath",  # unused (preprocess=False); says what the API takes
                    image_mode=None,
                    height=320,
                )
                input_age = gr.Number(
                    label="Age of the person in the photo (years)",
                    info="Sets the age of the reconstruction. 0 or empty: 19-29 is assumed.",
                    precision=0,
                    minimum=0,  # 0: not given (the box starts at 0)
                    maximum=120,
                )
                identity = gr.Checkbox(
                    value=True,
                    label="Preserve identity",
                    info="Optimize z so that a face-recognition network sees the same person "
                    "(slower).",
                )
                steps = gr.Slider(
                    0, MAX_IDENTITY_STEPS, value=IDENTITY_STEPS, step=1, label="Identity steps"
                )
                run = gr.Button("Age", variant="primary")
                gr.Examples(
                    examples=[
                        [str(EXAMPLES / "grace_hopper.jpg"), 77],
                        [str(EXAMPLES / "eileen_collins.jpg"), None],
                        [str(EXAMPLES / "cameraman.jpg"), None],
                    ],
                    inputs=[photo, input_age],
                    cache_examples=False,  # no outputs computed at start-up, on any machine
                )
            with gr.Column(scale=2):
                faces = gr.Gallery(
                    label="Reconstruction, then ages 0-18 to 60+", columns=7, height="auto"
                )
                notes = gr.Markdown()
                pasted = gr.Gallery(label="In the photo", columns=3, height="auto")
        gr.Markdown("## Blend ages")
        with gr.Row():
            with gr.Column(scale=1):
                position = gr.Slider(
                    0,
                    NUM_BUCKETS - 1,
                    value=START_POSITION,
                    step=0.05,
                    label="Age, young to old",
                    info="0 = 0-18, 1 = 19-29, ... 5 = 60+; sets the six sliders below",
                )
                start = age_weights(START_POSITION)
                weights = [
                    gr.Slider(0, 1, value=float(w), step=0.05, label=f"Weight of {label}")
                    for w, label in zip(start, BUCKET_LABELS, strict=True)
                ]
            with gr.Column(scale=2), gr.Row():
                blended_face = gr.Image(label="Blended face", height=256)
                blended_photo = gr.Image(label="Blended, in the photo")
        progression = gr.Image(
            label="Progression, youngest to oldest (GIF)", buttons=["download"], height=256
        )

        run.click(
            partial(age_photo, pipeline),
            inputs=[photo, input_age, identity, steps, session],
            outputs=[faces, pasted, progression, notes, session],
            api_name="age",
            preprocess=False,  # the handler reads the file itself, strictly, then deletes it
            concurrency_limit=AGE_CONCURRENCY,
            concurrency_id="age",
        ).success(
            partial(blend, pipeline),
            inputs=[session, *weights],
            outputs=[blended_face, blended_photo],
            api_visibility="private",
            concurrency_limit=RENDER_CONCURRENCY,
            concurrency_id="render",
        )
        render = dict(
            show_progress="minimal",
            trigger_mode="always_last",  # while a slider moves, only its latest value counts
            concurrency_limit=RENDER_CONCURRENCY,
            concurrency_id="render",
        )
        gr.on(
            [slider.input for slider in weights],
            partial(blend, pipeline),
            inputs=[session, *weights],
            outputs=[blended_face, blended_photo],
            api_name="blend",
            **render,
        )
        position.input(
            partial(sweep, pipeline),
            inputs=[session, position],
            outputs=[blended_face, blended_photo, *weights],
            api_name="sweep",
            **render,
        )
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def load_pipeline(model: str | None) -> tuple[AgingPipeline | None, str | None]:
    """The pipeline of a model folder (None: the shipped checkpoints/), or None and why not."""
    try:
        return AgingPipeline.from_pretrained(model), None
    except FileNotFoundError as error:
        return None, NO_MODEL if model is None else str(error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        default=os.environ.get("AGECGAN_MODEL"),
        help="model folder from train.py (default: $AGECGAN_MODEL, else the shipped checkpoints/)",
    )
    # None lets Gradio read GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, which Spaces set.
    parser.add_argument("--host", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)

    # A private cache folder: uploads and results of this server only, removed when it stops.
    cache = tempfile.mkdtemp(prefix="agecgan-app-")
    os.environ["GRADIO_TEMP_DIR"] = cache
    atexit.register(shutil.rmtree, cache, ignore_errors=True)
    # `docker stop` and Spaces send SIGTERM: stop as on Ctrl-C, so that the folder goes too.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    pipeline, message = load_pipeline(args.model)
    if message:
        print(message, file=sys.stderr)
    launch(
        build_demo(pipeline, message),
        server_name=args.host,
        server_port=args.port,
        share=args.share,
    )


def launch(demo: gr.Blocks, **options):
    """Serve the demo with the app's upload limit; the tests serve it through this too."""
    # Server-side rendering needs Node; plain serving works everywhere.
    return demo.launch(max_file_size=MAX_UPLOAD, ssr_mode=False, **options)


if __name__ == "__main__":
    main()
