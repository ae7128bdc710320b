"""A plain `pip install .`: the installed copy finds the shipped model, FR and age networks in its
own data folder and ages a real photo; a missing shipped file names every place looked."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from PIL import Image

from agecgan import BUCKET_LABELS, checkpoints
from agecgan.age_estimator import AgeEstimator
from agecgan.face_recognition import FaceRecognizer
from agecgan.pipeline import AgingPipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
import make_space  # noqa: E402

SIZE = 256  # the CLI's default --size
AGE_MODEL = "checkpoints/age_estimator/age-v1.onnx"
FR_WEIGHTS = "checkpoints/face_recognition/dlib_resnet_v1.safetensors"
# Run by the installed interpreter: where its agecgan and its defaults are, and then, with the
# age network moved aside, what from_pretrained says.
PROBE = """
import json
import agecgan, agecgan.age_estimator as a, agecgan.face_recognition as f, agecgan.pipeline as p
import agecgan.service as s
paths = {"package": agecgan.__file__, "model": p.DEFAULT_MODEL, "fr": f.WEIGHTS,
         "age": a.DEFAULT_MODEL, "examples": s.EXAMPLES_FOLDER}
a.DEFAULT_MODEL.parent.rename(a.DEFAULT_MODEL.parent.with_name("moved"))
try:
    a.AgeEstimator.from_pretrained()
except FileNotFoundError as error:
    paths["error"] = str(error)
print(json.dumps({key: str(value) for key, value in paths.items()}))
"""


def copy_tracked(root: Path, out: Path) -> Path:
    """The files git tracks, or would (new ones too, never ignored ones), copied to out: pip
    builds in the source folder, so its build/ and egg-info land in the copy, not the checkout."""
    for name in make_space.tracked_files(root, left_out=()):
        if (root / name).is_file():  # a tracked file deleted in the working tree is skipped
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, out / name)
    return out


def fresh_venv(folder: Path) -> Path:
    """A venv whose site-packages reaches this one's through a .pth (torch and the rest without
    a download); its own site-packages comes first, so the agecgan it imports is its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", folder], check=True)
    python = folder / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (Path(purelib) / "agecgan-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return python


@pytest.mark.slow
def test_pip_install_non_editable_ages_a_photo(tmp_path, grace_hopper):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout: the installed files are the tracked ones")
    began = time.perf_counter()
    source = copy_tracked(ROOT, tmp_path / "source")
    venv = (tmp_path / "venv").resolve()  # as the installed copy reports its paths
    python = fresh_venv(venv)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    # --ignore-installed: pip sees this venv's editable agecgan through the .pth, and must never
    # touch it; --no-index: nothing is downloaded.
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index"]
    install += ["--no-cache-dir", "--ignore-installed", "--quiet", source]
    subprocess.run(install, check=True, env=env, timeout=600)
    installed = time.perf_counter()

    elsewhere = tmp_path / "elsewhere"  # no checkout here or above: only the install can help
    elsewhere.mkdir()
    out = tmp_path / "out"
    command = [python, "-m", "agecgan", "age", str(grace_hopper), "--out", str(out)]
    done = subprocess.run(
        [*command, "--device", "cpu"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    aged = time.perf_counter()

    with Image.open(grace_hopper) as photo:
        photo_size = photo.size
    stem = grace_hopper.stem
    for label in BUCKET_LABELS:
        with Image.open(out / f"{stem}_age_{label}.png") as face:
            assert face.size == (SIZE, SIZE)
            assert any(low < high for low, high in face.getextrema())  # a face, not a blank
        with Image.open(out / f"{stem}_pasted_{label}.jpg") as pasted:
            assert pasted.size == photo_size
    with Image.open(out / f"{stem}_grid.png") as grid:  # input, reconstruction, six ages
        assert grid.width == 8 * SIZE and grid.height > SIZE
    with Image.open(out / f"{stem}_progression.gif") as gif:
        assert gif.n_frames > 1

    probe = subprocess.run(
        [python, "-c", PROBE], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert probe.returncode == 0, probe.stderr
    paths = {key: Path(value) for key, value in json.loads(probe.stdout).items() if key != "error"}
    data = venv / checkpoints.INSTALLED_FOLDER
    assert paths["package"].resolve().is_relative_to(venv)  # the installed copy, not the checkout's
    assert paths["model"] == data / "checkpoints"
    assert paths["fr"] == data / FR_WEIGHTS
    assert paths["age"] == data / AGE_MODEL
    assert paths["examples"] == data / "app/examples"
    assert not (data / "checkpoints/discriminator.safetensors").exists()  # training only
    error = json.loads(probe.stdout)["error"]
    assert str(paths["age"]) in error and "pip install --force-reinstall ." in error
    print(
        f"install {installed - began:.1f} s, age {aged - installed:.1f} s, "
        f"probe {time.perf_counter() - aged:.1f} s"
    )


@pytest.fixture
def places(tmp_path, monkeypatch):
    """A checkout and an install of our own making: (checkout root, install root)."""
    checkout, install = tmp_path / "checkout", tmp_path / "install"
    monkeypatch.setattr(checkpoints, "SOURCE_ROOT", checkout)
    monkeypatch.setattr(checkpoints, "installed_root", lambda: install)
    return checkout, install


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_the_checkout_comes_first_then_the_install(places):
    checkout, install = places
    assert checkpoints.shipped(AGE_MODEL) == install / AGE_MODEL  # in neither: a reinstall's place
    touch(install / AGE_MODEL)
    assert checkpoints.shipped(AGE_MODEL) == install / AGE_MODEL
    touch(checkout / AGE_MODEL)
    assert checkpoints.shipped(AGE_MODEL) == checkout / AGE_MODEL


@pytest.mark.parametrize(
    ("default", "loader", "name", "what"),
    [
        ("age_estimator.DEFAULT_MODEL", AgeEstimator, AGE_MODEL, "age model is"),
        ("face_recognition.WEIGHTS", FaceRecognizer, FR_WEIGHTS, "FR weights are"),
    ],
)
def test_a_missing_shipped_file_names_every_place_looked(
    places, monkeypatch, default, loader, name, what
):
    checkout, install = places
    monkeypatch.setattr(f"agecgan.{default}", checkpoints.shipped(name))  # found in neither
    with pytest.raises(FileNotFoundError) as error:
        loader.from_pretrained()
    message = str(error.value)
    assert message.startswith(f"the shipped {what} missing: looked at {checkout / name} and ")
    assert f" and {install / name}; " in message
    assert f"git checkout {Path(name).parent}" in message
    assert "pip install --force-reinstall ." in message


def test_a_missing_shipped_model_names_both_places(places, monkeypatch):
    checkout, install = places
    folder = checkpoints.shipped("checkpoints/config.json").parent  # found in neither
    monkeypatch.setattr("agecgan.pipeline.DEFAULT_MODEL", folder)
    with pytest.raises(FileNotFoundError, match="the shipped Age-cGAN model is missing") as error:
        AgingPipeline.from_pretrained()
    places = f"looked at {checkout / 'checkpoints'} and {install / 'checkpoints'}; "
    assert places in str(error.value)
