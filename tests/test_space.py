"""The Hugging Face Space: its metadata in the README, the folder app/make_space.py builds, and
that folder started the way a Space starts it (python app/app.py, host and port from the
environment, agecgan imported from the folder, not from an install)."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gradio
import pytest
import torch
import yaml
from helpers import TINY, free_port

from agecgan.checkpoints import export_model
from agecgan.networks import Encoder, Generator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
import make_space  # noqa: E402


def pinned(name: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE).group(1)


def test_readme_carries_space_metadata_that_matches_the_pins():
    _, metadata = make_space.space_metadata((ROOT / "README.md").read_text())
    assert metadata["sdk"] == "gradio"
    # The Space installs this gradio itself: it must be the one the tests ran against.
    assert metadata["sdk_version"] == pinned("gradio") == gradio.__version__
    assert str(metadata["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert (ROOT / metadata["app_file"]).is_file()
    assert metadata["suggested_hardware"].startswith(("t4", "a10g", "l4", "l40s", "a100"))
    assert metadata["license"] == "mit"


def test_the_space_folder_has_what_a_space_runs(tmp_path):
    out = make_space.make_space(tmp_path / "space")
    readme = (out / "README.md").read_text()
    front = re.match(r"---\n(.*?)---\n", readme, re.DOTALL)
    assert front, "a Space's README starts with its YAML front matter"
    assert yaml.safe_load(front.group(1))["app_file"] == "app/app.py"
    assert readme[front.end() :].lstrip() == (ROOT / "README.md").read_text().lstrip()
    for needed in ("app/app.py", "agecgan/pipeline.py", "requirements.txt", "LICENSE"):
        assert (out / needed).is_file(), needed
    assert (out / "checkpoints/face_recognition/dlib_resnet_v1.safetensors").is_file()
    assert not (out / "tests").exists() and not (out / ".ci").exists()


def test_the_space_folder_starts_as_a_space_starts_it(tmp_path, grace_hopper):
    from gradio_client import Client, handle_file

    out = make_space.make_space(tmp_path / "space")
    model = tmp_path / "model"
    torch.manual_seed(0)
    export_model(model, TINY, encoder=Encoder(TINY), generator=Generator(TINY))
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("GRADIO_", "PYTHONPATH"))
    }
    # What a Space sets; the marker shows which agecgan the app imported.
    env |= {
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_SERVER_PORT": str(port),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "AGECGAN_MODEL": str(model),
        "OMP_NUM_THREADS": "1",
    }
    (out / "agecgan" / "space_marker.py").write_text("HERE = True\n")
    app = out / "app" / "app.py"
    app.write_text(
        app.read_text().replace(
            "from agecgan.ages import",
            "import agecgan.space_marker  # noqa: E402, F401\nfrom agecgan.ages import",
        )
    )
    process = subprocess.Popen(
        [sys.executable, "app/app.py"], cwd=out, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                if process.poll() is not None:
                    pytest.fail(f"the Space's app exited: {process.stderr.read()}")
                if time.monotonic() > deadline:
                    pytest.fail("the Space's app did not answer within 120 s")
                time.sleep(1.0)
        faces, pasted, *_ = client.predict(
            handle_file(str(grace_hopper)), 80, False, 0, api_name="/age"
        )
        assert len(faces) == 7 and len(pasted) == 6
    finally:
        process.terminate()
        process.wait(30)
