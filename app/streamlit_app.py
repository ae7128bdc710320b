"""The Streamlit page: age a face from a photo, the webcam or an example; blend ages; get the GIF.

    streamlit run app/streamlit_app.py                  # the shipped checkpoints/
    streamlit run app/streamlit_app.py -- --model DIR   # or AGECGAN_MODEL=DIR

Layout, wiring and launch over agecgan.service: the limits, checks, messages and aging that the
Gradio app (app/app.py) uses too. Uploads stay in memory, and one user's aged photo lives in
their session only.
"""

import argparse
import hashlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image
from streamlit.delta_generator import DeltaGenerator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run app/streamlit_app.py` where agecgan is not installed
    sys.path.insert(0, str(ROOT))

from agecgan import service  # noqa: E402
from agecgan.adapt import DEFAULT_ADAPT_STEPS  # noqa: E402
from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS  # noqa: E402
from agecgan.align import Note  # noqa: E402
from agecgan.pipeline import (  # noqa: E402
    DEFAULT_MODEL,
    DEFAULT_RENDER,
    DEFAULT_STRENGTH,
    IDENTITY_STEPS,
    MAX_STRENGTH,
    RENDERS,
    AgingPipeline,
    AgingResult,
    age_weights,
)
from agecgan.service import EXAMPLES, RequestError  # noqa: E402

PHOTO_TYPES = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]  # what PIL reads
# Photos are shown at most this wide: Streamlit would otherwise shrink (and re-encode) a larger
# one on every rerun, that is at every move of a slider.
PHOTO_SIDE = 1024
SOURCES = ("Upload", "Webcam", "Example")  # the webcam asks for permission only when chosen

DESCRIPTION = """
Upload a photo, take one with the webcam or pick an example: the page finds the largest face,
encodes it into the generator's latent z, and draws that face at six ages, 0-18 to 60+. Then
blend the ages with the sliders, or sweep one continuous age, without encoding again. Photos
stay in this server's memory, for your session only; nothing is written to disk.
"""

log = logging.getLogger(__name__)


@dataclass
class Aged:
    """One photo aged, kept in st.session_state: the sliders re-render from z without E or
    identity optimization. Images are kept encoded, as the page sends them on every rerun."""

    key: tuple  # the photo's SHA-256 and the options it was aged with
    result: AgingResult  # aged and pasted emptied (the bytes below hold them); render needs z
    faces: list[bytes]  # PNG: the aligned input, the reconstruction, the six ages
    captions: list[str]
    photos: list[bytes]  # JPEG: the six ages pasted into the photo
    gif: bytes  # the progression, youngest to oldest and back
    notes: list[Note]  # what reading and aging changed or assumed


def model_folder(argv: list[str]) -> str | None:
    """--model after `--` on the command line, else $AGECGAN_MODEL, else None (checkpoints/)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--model")
    args, _ = parser.parse_known_args(argv)  # under a test runner, argv is the runner's
    return args.model or os.environ.get("AGECGAN_MODEL") or None


@st.cache_resource(show_spinner="Loading the model...")
def load_pipeline(folder: str | None) -> AgingPipeline:
    """One pipeline per model folder for the whole server; a failure is not cached, so a
    model trained into the folder later is found without a restart."""
    return AgingPipeline.from_pretrained(folder)


@st.cache_resource
def aging_slots() -> threading.BoundedSemaphore:
    """A CPU ages one or two photos at a time efficiently: the others wait for a slot."""
    return threading.BoundedSemaphore(service.AGE_CONCURRENCY)


def encode(image: Image.Image, image_format: str) -> bytes:
    """PNG (faces) or JPEG (photos, at most PHOTO_SIDE): what st.image sends as it is."""
    if image_format == "JPEG" and max(image.size) > PHOTO_SIDE:
        image = image.copy()
        image.thumbnail((PHOTO_SIDE, PHOTO_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, image_format, quality=90)  # photos: as the Gradio app saves them
    else:
        image.save(buffer, image_format)
    return buffer.getvalue()


def age_photo(
    pipeline: AgingPipeline,
    data: bytes,
    name: str,
    input_age: int | None,
    identity: bool,
    steps: int,
    render: str = DEFAULT_RENDER,
    strength: float = DEFAULT_STRENGTH,
    adapt_steps: int = DEFAULT_ADAPT_STEPS,
) -> Aged:
    """The session's Aged for this photo and these options: made once (progress bar), then
    reused on every rerun, so that moving a slider never encodes or optimizes again."""
    identity = identity and steps > 0
    drawing = dict(render=render, strength=strength, adapt_steps=adapt_steps)
    key = (
        hashlib.sha256(data).hexdigest(),
        input_age,
        identity,
        steps if identity else 0,
        *drawing.values(),
    )
    cached = st.session_state.get("aged")
    if cached is not None and cached.key == key:
        return cached
    st.session_state.pop("aged", None)  # one photo per session in memory, not two
    start = time.perf_counter()
    bar = st.progress(0.0, text="reading the photo")
    # The pipeline reports the identity steps, then the adaptation's, each counted from 1.
    names = ["identity steps"] * identity + ["adaptation steps"] * (adapt_steps > 0)
    phases: list[list] = []  # [name, steps, last loss]

    def progress(step: int, total: int, loss: float) -> None:
        if step == 1:
            phases.append([names[len(phases)], total, loss])
        phases[-1][2] = loss
        bar.progress(step / total, text=f"fitting the face: {phases[-1][0]} (loss {loss:.3f})")

    try:
        image, read_notes = service.read_upload(data, name)
        aged = _age(pipeline, image, read_notes, input_age, identity, steps, progress, bar, drawing)
    except BaseException:  # a user error, or Streamlit stopping this run for a newer one
        bar.empty()
        raise
    done = f"Aged in {time.perf_counter() - start:.1f} s"
    if phases:
        done += " (" + "; ".join(f"{total} {name}, loss {loss:.3f}" for name, total, loss in phases)
        done += ")"
    bar.progress(1.0, text=done)
    result = aged.result
    size = result.reconstruction.size
    faces = [result.aligned.resize(size, Image.Resampling.LANCZOS), result.reconstruction]
    captions = ["input (aligned)", f"reconstruction ({BUCKET_LABELS[result.input_bucket]})"]
    st.session_state["aged"] = Aged(
        key=key,
        result=aged.kept(),
        faces=[encode(face, "PNG") for face in faces + result.aged],
        captions=captions + list(BUCKET_LABELS),
        photos=[encode(photo, "JPEG") for photo in result.pasted],
        gif=aged.gif,
        notes=aged.notes,
    )
    return st.session_state["aged"]


def _age(
    pipeline: AgingPipeline,
    image: Image.Image,
    read_notes: list[Note],
    input_age: int | None,
    identity: bool,
    steps: int,
    progress: Callable[[int, int, float], None],
    bar: DeltaGenerator,
    drawing: dict,
) -> service.Aged:
    """service.age_photo (the faces, the notes, the GIF) in one of the server's aging slots;
    drawing: its render, strength and adapt_steps."""
    slots = aging_slots()
    while not slots.acquire(timeout=0.5):  # each st call lets Streamlit end a run gone stale
        bar.progress(0.0, text="waiting: other photos are being aged")
    try:
        bar.progress(0.0, text="finding the face")
        return service.age_photo(
            pipeline, image, read_notes, input_age, identity, steps, progress, **drawing
        )
    finally:
        slots.release()


def photo_input() -> tuple[bytes, str] | None:
    """The chosen photo as bytes and a display name, from the sidebar; None if none yet."""
    source = st.radio("Photo", SOURCES, horizontal=True, key="source")
    if source == "Upload":
        upload = st.file_uploader(
            "Upload a photo",
            type=PHOTO_TYPES,
            max_upload_size=service.MAX_UPLOAD_MB,
            key="upload",
        )
        return (upload.getvalue(), upload.name) if upload else None
    if source == "Webcam":
        shot = st.camera_input("Take a photo", key="camera")
        return (shot.getvalue(), "webcam photo") if shot else None
    example = st.selectbox(
        "Example",
        EXAMPLES,
        index=None,
        placeholder="Pick an example",
        key="example",
        on_change=_example_chosen,
    )
    if example is None:
        return None
    return (service.EXAMPLES_FOLDER / EXAMPLES[example][0]).read_bytes(), example


def _example_chosen() -> None:
    """An example brings its age along (None where it is not known), as in the Gradio app."""
    example = st.session_state.example
    if example is not None:
        st.session_state.input_age = EXAMPLES[example][1]


def _follow_position() -> None:
    """The continuous age slider sets the six bucket weights (they then render the blend)."""
    for bucket, weight in enumerate(age_weights(st.session_state.position)):
        st.session_state[f"weight_{bucket}"] = round(float(weight), 3)


def show(pipeline: AgingPipeline, aged: Aged) -> None:
    """The seven faces, the notes, the blend sliders and their face and photo, the GIF."""
    for column, face, caption in zip(
        st.columns(len(aged.faces)), aged.faces, aged.captions, strict=True
    ):
        column.image(face, caption=caption, output_format="PNG", width="stretch")
    for note in aged.notes:
        (st.warning if note.kind == "warning" else st.info)(note)

    st.subheader("Blend ages")
    st.session_state.setdefault("position", service.START_POSITION)
    for bucket, weight in enumerate(age_weights(service.START_POSITION)):
        st.session_state.setdefault(f"weight_{bucket}", round(float(weight), 3))
    sliders, blended_face, blended_photo = st.columns([1, 1, 2])
    with sliders:
        st.slider(
            "Age, young to old",
            0.0,
            float(NUM_BUCKETS - 1),
            step=0.05,
            key="position",
            on_change=_follow_position,
            help="0 = 0-18, 1 = 19-29, ... 5 = 60+; sets the six sliders below",
        )
        weights = [
            st.slider(f"Weight of {label}", 0.0, 1.0, step=0.05, key=f"weight_{bucket}")
            for bucket, label in enumerate(BUCKET_LABELS)
        ]
    try:
        face, photo = service.blend(pipeline, aged.result, weights)
    except RequestError as error:  # all six at 0
        blended_face.warning(str(error))
    else:
        blended_face.image(encode(face, "PNG"), caption="Blended face", output_format="PNG")
        blended_photo.image(
            encode(photo, "JPEG"), caption="Blended, in the photo", output_format="JPEG"
        )

    st.subheader("Progression, youngest to oldest")
    st.image(aged.gif, width=256)
    st.download_button(
        "Download the progression (GIF)",
        aged.gif,
        file_name="progression.gif",
        mime="image/gif",
        on_click="ignore",  # a download needs no rerun
    )
    with st.expander("Every age in the photo"):
        columns = st.columns(3)
        for index, (photo, label) in enumerate(zip(aged.photos, BUCKET_LABELS, strict=True)):
            columns[index % 3].image(photo, caption=label, output_format="JPEG", width="stretch")


def main() -> None:
    st.set_page_config(page_title="Age-cGAN", layout="wide")
    st.title("Age-cGAN: one face at every age")
    st.markdown(DESCRIPTION)
    folder = model_folder(sys.argv[1:])
    try:
        pipeline = load_pipeline(folder)
    except FileNotFoundError as error:
        st.error(service.NO_MODEL if folder is None else str(error))
        st.caption("Here: `streamlit run app/streamlit_app.py -- --model DIR`")
        return
    except Exception as error:  # a damaged file, a folder of another architecture
        log.exception("the model could not be loaded")
        st.error(f"The model in {folder or DEFAULT_MODEL} could not be loaded: {error}")
        return
    with st.sidebar:
        photo = photo_input()
        input_age = st.number_input(
            "Age of the person in the photo (years)",
            min_value=service.MIN_AGE,
            max_value=service.MAX_AGE,
            value=None,
            step=1,
            placeholder="unknown: estimated from the photo",
            key="input_age",
            help="Sets the age of the reconstruction. Empty: estimated from the photo.",
        )
        identity = st.toggle(
            "Preserve identity",
            value=True,
            help="Optimize z so that a face-recognition network sees the same person (slower).",
        )
        steps = st.slider(
            "Identity steps",
            0,
            service.MAX_IDENTITY_STEPS,
            IDENTITY_STEPS,
            disabled=not identity,
        )
        render = st.radio(
            "Drawing",
            RENDERS,
            index=RENDERS.index(DEFAULT_RENDER),
            horizontal=True,
            key="render",
            help="generated: the generator draws the whole face. detail: your own face, with "
            "only the generator's age change added (sharper, more like you).",
        )
        strength = st.slider(
            "Strength of the age change",
            0.0,
            MAX_STRENGTH,
            DEFAULT_STRENGTH,
            step=0.05,
            key="strength",
            help="1: as the generator draws it; 0: none; 2: twice as much.",
        )
        adapt_steps = st.slider(
            "Adaptation steps",
            0,
            service.MAX_ADAPT_STEPS,
            DEFAULT_ADAPT_STEPS,
            key="adapt_steps",
            help="Tune a copy of the generator to this face first (slower; 0: off).",
        )
    if photo is None:
        st.info(service.NO_PHOTO)
        return
    try:
        aged = age_photo(
            pipeline, *photo, input_age, identity, steps, render, strength, adapt_steps
        )
    except RequestError as error:
        st.error(str(error))
        return
    show(pipeline, aged)


try:
    main()
except Exception as error:  # a bug, not the user's photo: a message here, the trace in the log
    log.exception("the page failed")
    st.error(f"Something went wrong on our side ({type(error).__name__}: {error}).")
