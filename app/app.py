"""The Gradio app: age a face from a photo or the webcam, blend ages, download the sweep.

Layout, wiring and launch over agecgan.service (the limits, checks, messages and aging it shares
with the Streamlit page); what is Gradio's own lives here: the upload files and their folders,
the result files in Gradio's cache, and ZeroGPU's @spaces.GPU on a Space.
"""

import argparse
import asyncio
import atexit
import contextlib
import copy
import glob
import itertools
import json
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder
from gradio_client.utils import is_http_url_like
from PIL import Image
from starlette.middleware import Middleware

try:  # ZeroGPU's package (a Space installs it); elsewhere its decorator changes nothing
    import spaces
except ImportError:
    spaces = None

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python app/app.py` where agecgan is not installed (a Space)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from agecgan import service  # noqa: E402
from agecgan.adapt import DEFAULT_ADAPT_STEPS  # noqa: E402
from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS  # noqa: E402
from agecgan.align import Note  # noqa: E402
from agecgan.pipeline import (  # noqa: E402
    DEFAULT_RENDER,
    DEFAULT_STRENGTH,
    IDENTITY_STEPS,
    MAX_STRENGTH,
    RENDERS,
    AgingPipeline,
    AgingResult,
    age_weights,
)
from agecgan.service import (  # noqa: E402, F401 (NO_MODEL, MAX_IDENTITY_STEPS: the tests')
    EXAMPLES,
    EXAMPLES_FOLDER,
    MAX_ADAPT_STEPS,
    MAX_IDENTITY_STEPS,
    NO_MODEL,
    NO_PHOTO,
    START_POSITION,
    RequestError,
)

MAX_UPLOAD = f"{service.MAX_UPLOAD_MB}mb"  # larger files are refused by Gradio itself
# Results (faces, pasted photos, the GIF) live in Gradio's cache until the sweep: every
# CACHE_SWEEP_S, files older than CACHE_AGE_S go; long enough to view and download them.
CACHE_SWEEP_S, CACHE_AGE_S = 60, 300
SESSION_TTL_S = 1800  # an idle session's aged photo is dropped from memory after this
# A CPU runs one or two agings at a time efficiently; the rest wait in a bounded queue.
RENDER_CONCURRENCY, QUEUE_SIZE = 4, 64
GONE = (
    "The photo is no longer on the server (uploads are deleted as soon as they are read). "
    "Please upload it again."
)
NO_SESSION = (
    "Age a photo first (upload one and press Age). An idle session's photo is forgotten after "
    f"{SESSION_TTL_S // 60} minutes."
)
NO_URL = (
    "Photos are taken as files only, not as URLs (the server does not fetch them): download "
    "the photo and send the file."
)
# ZeroGPU lends a GPU to the decorated function for at most its duration, and serves shorter
# requests first. Measured on one busy 2-core CPU core with the shipped model: the function
# takes 0.05 s without identity optimization and 65 ms per identity step (6.5 s for 100);
# a GPU slice should take well under a tenth of that once warm (an estimate: no GPU here). The
# duration is that CPU time plus 5 s for a cold worker: never too short, still short.
GPU_BASE_S, GPU_STEP_S = 5.0, 0.065
GPU_ADAPT_STEP_S = 0.1  # a step of tuning G to the photo, on the same CPU core
ZERO_GPU = spaces is not None and os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")


@dataclass
class Session:
    """One user's aged photo, kept in gr.State so the sliders re-render without the encoder."""

    result: AgingResult  # aged and pasted emptied: the galleries hold them; render needs z
    source: str  # the uploaded file it came from (deleted once read)
    read_notes: list[Note]  # what reading the file changed (EXIF, frames, size)


def age_photo(
    pipeline: AgingPipeline | None,
    photo,
    input_age: float | None,
    identity: bool,
    steps: float,
    render: str = DEFAULT_RENDER,
    strength: float = DEFAULT_STRENGTH,
    adapt_steps: float = DEFAULT_ADAPT_STEPS,
    session: Session | None = None,
    progress=gr.Progress(),  # noqa: B008 (Gradio's way to ask for a progress bar)
):
    """Age the largest face in a photo (a path, or Gradio's file dict when wired to the UI).

    Returns (path, caption) pairs of the reconstruction and the six aged faces, the same for
    the six pasted photos, the GIF's path, the notes (Markdown) and the new Session. Raises
    gr.Error with a message for the user; the uploaded file is deleted whatever happens.
    """
    path, name = _photo_path(photo)
    try:
        if pipeline is None:
            raise RequestError(NO_MODEL)
        if path is None:
            raise RequestError(NO_PHOTO)
        age, steps = service.check_age(input_age), service.check_steps(steps)
        render, strength = service.check_render(render), service.check_strength(strength)
        adapt_steps = service.check_adapt_steps(adapt_steps)
        progress(0, desc="reading the photo")
        if Path(path).is_file():
            image, read_notes = service.read_upload(path, name)
        elif session is not None and session.source == path:
            # The upload was deleted after its first run; the photo is still in this session.
            image, read_notes = session.result.photo, session.read_notes
        else:
            raise RequestError(GONE)
    except RequestError as error:
        raise gr.Error(str(error)) from error
    finally:
        if path is not None:
            _delete_upload(path)  # read, or refused: either way it goes now
    progress(0, desc="finding the face")
    try:
        aged = service.age_photo(
            pipeline,
            image,
            read_notes,
            age,
            identity,
            steps,
            progress=lambda step, total, loss: progress(
                (step, total), desc=f"fitting the face (loss {loss:.3f})"
            ),
            faces_from=_faces_from(pipeline),
            render=render,
            strength=strength,
            adapt_steps=adapt_steps,
        )
    except RequestError as error:
        raise gr.Error(str(error)) from error
    result, folder = aged.result, result_folder()
    gif = folder / "progression.gif"
    gif.write_bytes(aged.gif)
    reconstruction = f"reconstruction ({BUCKET_LABELS[result.input_bucket]})"
    faces = [(save(result.reconstruction, folder / "reconstruction.png"), reconstruction)]
    pasted = []
    for label, face, whole in zip(BUCKET_LABELS, result.aged, result.pasted, strict=True):
        stem = f"age_{label.replace('+', '_plus')}"  # download names; no '+' in URLs
        faces.append((save(face, folder / f"{stem}.png"), label))
        pasted.append((save(whole, folder / f"photo_{stem}.jpg"), label))
    notes = "\n".join(
        f"- **{note}**" if note.kind == "warning" else f"- {note}" for note in aged.notes
    )
    # Six full-size photos per user stay out of memory: the galleries hold them.
    return faces, pasted, str(gif), notes, Session(aged.kept(), path, read_notes)


def blend(pipeline: AgingPipeline | None, session: Session | None, *weights: float):
    """The face and pasted photo for six age weights (any non-negative mix, not all 0)."""
    result = _session_result(pipeline, session)
    try:
        return _save_render(*service.blend(pipeline, result, weights))
    except RequestError as error:
        raise gr.Error(str(error)) from error


def sweep(pipeline: AgingPipeline | None, session: Session | None, position: float):
    """The face and pasted photo at a continuous age (0 = 0-18 ... 5 = 60+), and the six
    bucket weights it stands for (so that the bucket sliders follow)."""
    result = _session_result(pipeline, session)
    try:
        face, photo, weights = service.sweep(pipeline, result, position)
    except RequestError as error:
        raise gr.Error(str(error)) from error
    return *_save_render(face, photo), *weights


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


def _save_render(face: Image.Image, photo: Image.Image) -> tuple[str, str]:
    folder = result_folder()
    return save(face, folder / "blend.png"), save(photo, folder / "blend.jpg")


def _photo_path(photo) -> tuple[str | None, str | None]:
    """The file path and a display name of the photo input; (None, None) when there is none."""
    if isinstance(photo, dict):  # Gradio's FileData, passed unprocessed (preprocess=False)
        path, name = photo.get("path"), photo.get("orig_name")
    else:
        path, name = photo, None
    if not path:
        return None, None
    return str(path), name or Path(path).name


def _session_result(pipeline: AgingPipeline | None, session: Session | None) -> AgingResult:
    if pipeline is None:
        raise gr.Error(NO_MODEL)
    if session is None:
        raise gr.Error(NO_SESSION)
    return session.result


# Uploads. Gradio keeps each under a folder named by the hash of its bytes, so users who send
# the same photo get the same file, and the first request to read it would delete it under
# the others. OwnUploadFolders gives every upload a folder of its own instead; each request
# then deletes its own file, and only that, as soon as it has read it.
_UPLOAD_LOCK = threading.Lock()  # moves of uploads, and their deletion, one at a time


def _delete_upload(path: str) -> None:
    """Delete a file Gradio received from a user (never one of ours, such as an example)."""
    file, uploads = Path(path).resolve(), Path(get_upload_folder()).resolve()
    if not file.is_relative_to(uploads) or file == uploads:
        return
    with _UPLOAD_LOCK:
        file.unlink(missing_ok=True)
        if file.parent != uploads:  # each upload has a folder of its own
            with contextlib.suppress(OSError):
                file.parent.rmdir()


def own_upload_folder(path: str) -> str:
    """Move an upload from Gradio's folder (named by the hash of its bytes) into a new folder
    of its own beside it; returns the new path (the old one if it is not an upload)."""
    file, uploads = Path(path).resolve(), Path(get_upload_folder()).resolve()
    if not file.is_relative_to(uploads) or file.parent == uploads:
        return path
    own = uploads / f"{file.parent.name}-{secrets.token_hex(8)}" / file.name
    with _UPLOAD_LOCK:
        own.parent.mkdir()
        try:
            os.link(file, own)
        except FileNotFoundError:
            # A second upload of the same bytes and name: Gradio renamed it onto the first one's
            # path before that one was moved, so the bytes are in a folder moved already.
            twins = sorted(uploads.glob(f"{file.parent.name}-*/{glob.escape(file.name)}"))
            if not twins:
                own.parent.rmdir()
                return path
            os.link(twins[0], own)
        else:
            file.unlink()
            with contextlib.suppress(OSError):
                file.parent.rmdir()
    return str(own)


class OwnUploadFolders:
    """ASGI middleware over Gradio's upload route: the paths it answers are rewritten to the
    upload's own folder (own_upload_folder), before the client can use them."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not path.endswith("/gradio_api/upload")
        ):
            await self.app(scope, receive, send)
            return
        start, chunks = None, []

        async def rewrite(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message  # held until the body is known: its length changes
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start["status"] == 200:
                paths = json.loads(body)
                body = json.dumps([own_upload_folder(p) for p in paths]).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def sweep_empty_folders(cache: Path, older_than_s: float) -> int:
    """Remove the empty folders inside the cache (result folders whose files Gradio's sweep
    deleted, uploads' folders) untouched for older_than_s; returns how many went."""
    removed, cutoff = 0, time.time() - older_than_s
    for folder in sorted(cache.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        if folder == cache:
            continue
        with contextlib.suppress(OSError):  # not empty, or gone meanwhile
            if folder.stat().st_mtime < cutoff:
                folder.rmdir()
                removed += 1
    return removed


@contextlib.asynccontextmanager
async def _sweeping(app):
    """While the server runs: sweep empty folders as often as Gradio sweeps old files."""

    async def every_sweep():
        while True:
            await asyncio.sleep(CACHE_SWEEP_S)
            cache = Path(get_upload_folder())
            if cache.is_dir():
                await asyncio.to_thread(sweep_empty_folders, cache, CACHE_SWEEP_S)

    task = asyncio.create_task(every_sweep())
    try:
        yield
    finally:
        task.cancel()


def refusing_urls(image: gr.Image) -> gr.Image:
    """The photo input, made to refuse a photo given as a URL: Gradio would fetch it itself,
    with no cap on its size, before any handler could look at it. (A subclass of gr.Image would
    do the same, but Gradio writes a .pyi stub beside the file of every component subclass.)"""
    move_to_cache = image.async_move_resource_to_block_cache

    async def files_only(url_or_file_path):
        if url_or_file_path is not None and is_http_url_like(str(url_or_file_path)):
            raise gr.Error(NO_URL)
        return await move_to_cache(url_or_file_path)

    image.async_move_resource_to_block_cache = files_only
    return image


# ZeroGPU: the GPU-heavy part of an aging (E, identity optimization, G for the seven faces)
# runs in faces_on_gpu, in a worker that holds a GPU only for that call. Its arguments and
# results cross to that worker pickled, so it takes a key and the aligned face, never the
# pipeline; detection, paste-back and the sliders stay on the CPU, and never wait for a GPU.
_GPU_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pipeline -> key
_ON_GPU: dict[int, AgingPipeline] = {}  # key -> the pipeline faces_on_gpu runs
_next_key = itertools.count()


def gpu_seconds(key, face, bucket, grayscale, steps, adapt_steps=0, progress=None) -> int:
    """The duration ZeroGPU grants one call of faces_on_gpu (GPU_BASE_S, GPU_STEP_S)."""
    return math.ceil(GPU_BASE_S + GPU_STEP_S * steps + GPU_ADAPT_STEP_S * adapt_steps)


def faces_on_gpu(
    key: int, face, bucket: int, grayscale: bool, steps: int, adapt_steps=0, progress=None
):
    """AgingPipeline.faces_from of the pipeline registered under key: z, the adaptation and
    seven faces."""
    return _ON_GPU[key].faces_from(face, bucket, grayscale, steps, adapt_steps, progress)


if spaces is not None:
    faces_on_gpu = spaces.GPU(duration=gpu_seconds)(faces_on_gpu)


def register_for_gpu(pipeline: AgingPipeline, on_gpu: AgingPipeline | None = None) -> int:
    """The key under which faces_on_gpu finds `on_gpu` (default: the pipeline itself)."""
    if pipeline not in _GPU_KEYS:
        _GPU_KEYS[pipeline] = next(_next_key)
    _ON_GPU[_GPU_KEYS[pipeline]] = on_gpu or pipeline
    return _GPU_KEYS[pipeline]


def _faces_from(pipeline: AgingPipeline):
    """What the pipeline runs for its GPU-heavy part: faces_on_gpu where `spaces` is installed
    (on ZeroGPU without the progress callback, which cannot cross to the worker)."""
    if spaces is None:
        return None
    key = _GPU_KEYS.get(pipeline)
    if key is None:
        key = register_for_gpu(pipeline)

    def run(face, bucket, grayscale, steps, adapt_steps, progress):
        progress = None if ZERO_GPU else progress
        return faces_on_gpu(key, face, bucket, grayscale, steps, adapt_steps, progress)

    return run


def zero_gpu_pipelines(model: str | None) -> AgingPipeline:
    """On ZeroGPU: the pipeline on the CPU (detection, paste-back, sliders), and a copy of E, G
    and FR moved to CUDA at start, as ZeroGPU prescribes, for faces_on_gpu."""
    pipeline = AgingPipeline.from_pretrained(model, device="cpu")
    on_gpu = AgingPipeline(
        copy.deepcopy(pipeline.encoder),
        copy.deepcopy(pipeline.generator),
        aligner=pipeline.aligner,  # MTCNN stays on the CPU
        device="cuda",
    )
    on_gpu.recognizer  # noqa: B018 (FR loaded and moved now, not in the worker)
    register_for_gpu(pipeline, on_gpu)
    return pipeline


def device_line(pipeline: AgingPipeline | None) -> str:
    """Where the app runs, for the start-up log: a silent fall-back to the CPU shows here."""
    cuda = torch.version.cuda
    line = f"agecgan app: torch {torch.__version__}, CUDA build {cuda or 'none (CPU-only torch)'}"
    if ZERO_GPU:
        return f"{line}; ZeroGPU: aging on a lent GPU (@spaces.GPU), sliders on the CPU"
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name(0)}"
    elif cuda:
        line += ", but no usable GPU (none, or a driver older than this CUDA build needs)"
    where = pipeline.device if pipeline is not None else "no model"
    return f"{line}; running on {where}"


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
    gr.set_static_paths([EXAMPLES_FOLDER])
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
                photo = refusing_urls(
                    gr.Image(
                        label="Photo",
                        sources=["upload", "webcam"],
                        type="filepath",  # unused (preprocess=False); says what the API takes
                        image_mode=None,
                        height=320,
                    )
                )
                input_age = gr.Number(
                    label="Age of the person in the photo (years)",
                    info="Sets the age of the reconstruction. 0 or empty: estimated from the "
                    "photo.",
                    precision=0,
                    minimum=0,  # 0: not given (the box starts at 0)
                    maximum=service.MAX_AGE,
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
                render_mode = gr.Radio(
                    list(RENDERS),
                    value=DEFAULT_RENDER,
                    label="Drawing",
                    info="generated: the generator draws the whole face. detail: your own face, "
                    "with only the generator's age change added (sharper, more like you).",
                )
                strength = gr.Slider(
                    0,
                    MAX_STRENGTH,
                    value=DEFAULT_STRENGTH,
                    step=0.05,
                    label="Strength of the age change",
                    info="1: as the generator draws it; 0: none; 2: twice as much.",
                )
                adapt_steps = gr.Slider(
                    0,
                    MAX_ADAPT_STEPS,
                    value=DEFAULT_ADAPT_STEPS,
                    step=1,
                    label="Adaptation steps",
                    info="Tune a copy of the generator to this face first (slower; 0: off).",
                )
                run = gr.Button("Age", variant="primary")
                gr.Examples(
                    examples=[
                        [str(EXAMPLES_FOLDER / file), age] for file, age in EXAMPLES.values()
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

        # The handlers run in this process (only faces_on_gpu crosses to a GPU worker), so
        # binding the pipeline with partial ships nothing anywhere.
        run.click(
            partial(age_photo, pipeline),
            inputs=[photo, input_age, identity, steps, render_mode, strength, adapt_steps, session],
            outputs=[faces, pasted, progression, notes, session],
            api_name="age",
            preprocess=False,  # the handler reads the file itself, strictly, then deletes it
            concurrency_limit=service.AGE_CONCURRENCY,
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
        if ZERO_GPU:
            return zero_gpu_pipelines(model), None
        return AgingPipeline.from_pretrained(model), None
    except FileNotFoundError as error:
        return None, NO_MODEL if model is None else str(error)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    print(device_line(pipeline), file=sys.stderr, flush=True)
    if message:
        print(message, file=sys.stderr)
    launch(
        build_demo(pipeline, message),
        server_name=args.host,
        server_port=args.port,
        share=args.share,
    )


def launch(demo: gr.Blocks, **options):
    """Serve the demo with the app's upload limit, an own folder for every upload and the sweep
    of empty folders; the tests serve it through this too."""
    app_kwargs = {"middleware": [Middleware(OwnUploadFolders)], "lifespan": _sweeping}
    # Server-side rendering needs Node; plain serving works everywhere.
    return demo.launch(max_file_size=MAX_UPLOAD, ssr_mode=False, app_kwargs=app_kwargs, **options)


if __name__ == "__main__":
    main()
