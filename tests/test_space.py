"""The Hugging Face Space: its metadata in the README, the folder app/make_space.py builds, that
folder started the way a Space starts it (python app/app.py, host and port from the
environment, agecgan imported from the folder, not from an install), with and without ZeroGPU's
`spaces` package; the builder's own pip command dry-run against PyPI; the model card's
metadata; and the Streamlit page's Docker Space running its Dockerfile's command."""

import json
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
from helpers import TINY, free_port, streamlit_answers, vivid_generator

from agecgan import service
from agecgan.checkpoints import export_model
from agecgan.networks import Encoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
import make_space  # noqa: E402


def pinned(name: str) -> str:
    text = (ROOT / "requirements.txt").read_text()
    return re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE).group(1)


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)---\n", text, re.DOTALL)
    assert match, "a Hub README starts with its YAML front matter"
    return yaml.safe_load(match.group(1))


CARD = front_matter((ROOT / "checkpoints" / "README.md").read_text())


def test_readme_carries_space_metadata_that_matches_the_pins():
    _, metadata = make_space.space_metadata((ROOT / "README.md").read_text())
    assert metadata["sdk"] == "gradio"
    # The Space installs this gradio itself: it must be the one the tests ran against.
    assert metadata["sdk_version"] == pinned("gradio") == gradio.__version__
    # A Python ZeroGPU offers (3.10.13 or 3.12.12): the dry run below resolves for it.
    assert str(metadata["python_version"]) in ("3.10", "3.12")
    assert (ROOT / metadata["app_file"]).is_file()
    assert metadata["suggested_hardware"].startswith(("t4", "a10g", "l4", "l40s", "a100"))
    # The weights are UTKFace's derivative, non-commercial: not a bare mit (the code's).
    assert metadata["license"] == "other" and metadata["license_name"] == CARD["license_name"]


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
    assert (out / "agecgan" / "service.py").is_file()  # new files too, before their commit
    assert not (out / "tests").exists() and not (out / ".ci").exists()
    assert not (out / "Dockerfile").exists()  # a Gradio Space is built by Hugging Face's image
    requirements = (out / "requirements.txt").read_text()
    for name, version in make_space.SPACE_PINS.items():  # ZeroGPU's torch, not the dev one
        assert make_space.pinned(requirements, name) == version
    assert make_space.pinned(requirements, "spaces") == make_space.pinned(
        (ROOT / "requirements-dev.txt").read_text(), "spaces"
    )
    dev = (ROOT / "requirements.txt").read_text()
    assert make_space.pinned(requirements, "gradio") == make_space.pinned(dev, "gradio")


@pytest.mark.parametrize("spaces", ["installed", "absent"])
def test_the_space_folder_starts_as_a_space_starts_it(tmp_path, grace_hopper, spaces):
    from gradio_client import Client, handle_file

    out = make_space.make_space(tmp_path / "space")
    model = tmp_path / "model"
    torch.manual_seed(0)
    export_model(model, TINY, encoder=Encoder(TINY), generator=vivid_generator())
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
    if spaces == "absent":  # as on a laptop: `import spaces` fails
        hidden = tmp_path / "hidden" / "spaces"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('spaces is absent here')\n")
        env["PYTHONPATH"] = str(hidden.parent)
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
    log = process.stderr.read()
    # Where it ran, first: a silent fall-back to the CPU shows here.
    assert f"agecgan app: torch {torch.__version__}, CUDA build " in log, log
    assert "running on cpu" in log or "running on cuda" in log, log


def test_the_model_card_carries_the_hubs_metadata():
    assert CARD["license"] == "other"  # UTKFace: non-commercial research only
    assert CARD["license_name"] == "utkface-non-commercial"
    assert (ROOT / "checkpoints" / CARD["license_link"]).is_file()
    assert CARD["pipeline_tag"] == "image-to-image" and CARD["library_name"] == "pytorch"
    assert {"face-aging", "gan", "age-cgan"} <= set(CARD["tags"])
    _, metadata = make_space.space_metadata((ROOT / "README.md").read_text())
    assert (ROOT / metadata["license_link"]).resolve() == ROOT / "checkpoints" / "README.md"


# The builder's platform: its python image is Debian (glibc 2.36) on x86-64; pip expands none
# of these tags itself, so the older aliases are named too.
BUILDER_PLATFORMS = [
    *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)),
    *("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"),
]


@pytest.mark.skipif(
    os.environ.get("AGECGAN_SKIP_PYPI") == "1", reason="AGECGAN_SKIP_PYPI=1: no PyPI here"
)
def test_the_space_builders_install_command_resolves(tmp_path):
    """The one pip command a Gradio Space's builder runs on the Space's requirements.txt, for
    its sdk_version and python_version, dry-run against PyPI: it fails on any conflict."""
    out = make_space.make_space(tmp_path / "space")
    _, metadata = make_space.space_metadata((out / "README.md").read_text().split("---\n", 2)[2])
    version = str(metadata["python_version"])
    command = [
        *(sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"),
        *("--quiet", "--report", "-", "--only-binary", ":all:"),
        *("--python-version", version, "--implementation", "cp"),
        *("--abi", f"cp{version.replace('.', '')}"),
        *(f"--platform={platform}" for platform in BUILDER_PLATFORMS),
        *make_space.builder_command(metadata["sdk_version"], str(out / "requirements.txt")),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    errors = [line for line in done.stderr.splitlines() if not line.startswith("WARNING")]
    assert done.returncode == 0, "\n".join(errors[-40:])
    installed = {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(done.stdout)["install"]
    }
    assert installed["gradio"] == metadata["sdk_version"] and "mcp" in installed
    assert installed["torch"] == make_space.SPACE_PINS["torch"]
    assert installed["pydantic"] == pinned("pydantic")


def test_the_streamlit_docker_space_runs_its_command(tmp_path):
    out = make_space.make_space(tmp_path / "space", streamlit=True)
    front = front_matter((out / "README.md").read_text())
    assert front["sdk"] == "docker" and front["license"] == "other"
    dockerfile = (out / "Dockerfile").read_text()
    [cmd] = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    command = json.loads(cmd)
    assert command[:2] == ["streamlit", "run"] and (out / command[2]).is_file()
    env = {**os.environ, "HOME": str(tmp_path / "home")}  # the container's user has none yet
    env.pop("AGECGAN_MODEL", None)
    streamlit = [sys.executable, "-m", "streamlit"]
    # The settings Streamlit reads in that folder: what uploads inside a Space need.
    shown = subprocess.run(
        [*streamlit, "config", "show"], cwd=out, env=env, capture_output=True, text=True
    ).stdout
    for setting in (
        "enableXsrfProtection = false",
        f"maxUploadSize = {service.MAX_UPLOAD_MB}",  # the apps' one limit
        f"port = {front['app_port']}",
        'address = "0.0.0.0"',
        "gatherUsageStats = false",
    ):
        assert re.search(rf"^{re.escape(setting)}$", shown, re.MULTILINE), setting
    # The Dockerfile's command itself, here on a loopback port (the Space's 0.0.0.0:8501 is
    # the container's; environment settings win over the file's).
    port = free_port()
    env |= {"STREAMLIT_SERVER_ADDRESS": "127.0.0.1", "STREAMLIT_SERVER_PORT": str(port)}
    log = tmp_path / "streamlit.log"
    with log.open("wb") as output:
        server = subprocess.Popen(
            [*streamlit, *command[1:]], cwd=out, env=env, stdout=output, stderr=output
        )
    try:
        answers = streamlit_answers(server, port)
        assert set(answers) == {"/", "/_stcore/health"}, log.read_text()
        assert answers["/_stcore/health"] == (200, b"ok")
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
