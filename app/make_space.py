"""Assemble the folder to upload as a Hugging Face Space: the Gradio app (ZeroGPU or a dedicated
GPU), or with --streamlit the Streamlit page as a Docker Space. The folder holds the tracked
files, minus what a Space does not run, a requirements.txt for the Space, and README.md with the
Space's metadata (a YAML block of the README's "Hugging Face Space" section) as front matter.

    python app/make_space.py [--out build/space]                        # Gradio Space
    python app/make_space.py --streamlit [--out build/space-streamlit]  # Docker Space
    hf upload USER/SPACE build/space . --repo-type space

A Gradio Space installs its requirements.txt in one pip command with its own packages
(builder_command) and runs app/app.py, which adds the repository root to sys.path, so agecgan
needs no install step there. The Docker Space builds the Dockerfile.
"""

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LEFT_OUT = ("tests/", ".ci/", "bench/", ".gitignore", "Makefile")  # what a Space never runs
SECTION = "## Hugging Face Space"
STREAMLIT_SECTION = "### The Streamlit page as a Docker Space"
# ZeroGPU accepts a fixed list of torch releases (Hugging Face's spaces-zerogpu docs, September
# 2026: 2.8.0, 2.9.1, 2.10.0, 2.11.0, 2.12.1, 2.13.0) and Python 3.10.13 or 3.12.12. The project
# runs torch 2.14.1, which is not on the list: the Space gets the newest listed torch instead,
# with its torchvision. Nothing here uses an API newer than 2.13.
SPACE_PINS = {"torch": "2.13.0", "torchvision": "0.28.0"}
# The Streamlit page's settings in the Docker Space (its .streamlit/config.toml there).
STREAMLIT_SETTINGS = ROOT / "app" / "streamlit_space.toml"


def space_metadata(readme: str, section: str = SECTION) -> tuple[str, dict]:
    """The YAML block that follows a heading of the README: its text and its values."""
    part = readme.split(section + "\n", 1)
    if len(part) != 2:
        raise ValueError(f"README.md has no '{section}' section")
    match = re.search(r"```yaml\n(.*?)```", part[1], re.DOTALL)
    if match is None:
        raise ValueError(f"README.md's '{section}' section has no ```yaml block")
    return match.group(1), yaml.safe_load(match.group(1))


def pinned(requirements: str, name: str) -> str:
    """The version pinned for a package in a requirements file's text."""
    match = re.search(rf"^{re.escape(name)}==([^\s#]+)", requirements, re.MULTILINE)
    if match is None:
        raise ValueError(f"{name} is not pinned")
    return match.group(1)


def space_requirements(root: Path = ROOT) -> str:
    """requirements.txt with the torch a ZeroGPU Space accepts (SPACE_PINS), plus the spaces
    package of requirements-dev.txt, the one the tests ran the app with."""
    text = (root / "requirements.txt").read_text()
    for name, version in SPACE_PINS.items():
        text, count = re.subn(
            rf"^{re.escape(name)}==[^\s#]+",
            f"{name}=={version}  # ZeroGPU's newest (make_space.SPACE_PINS)",
            text,
            flags=re.MULTILINE,
        )
        if count != 1:
            raise ValueError(f"requirements.txt pins {name} {count} times, not once")
    spaces = pinned((root / "requirements-dev.txt").read_text(), "spaces")
    return f"{text}# ZeroGPU's @spaces.GPU (the builder adds it unpinned)\nspaces=={spaces}\n"


def builder_command(sdk_version: str, requirements: str = "requirements.txt") -> list[str]:
    """The arguments of the one `pip install` a Gradio Space's builder runs on the Space's
    requirements (as its build logs show: `pip install --no-cache-dir -r requirements.txt
    gradio[oauth,mcp]==<sdk_version> "uvicorn>=0.14.0" "websockets>=10.4" spaces`)."""
    return [
        *("-r", requirements),
        f"gradio[oauth,mcp]=={sdk_version}",
        "uvicorn>=0.14.0",
        "websockets>=10.4",
        "spaces",
    ]


def tracked_files(root: Path, left_out: tuple[str, ...] = LEFT_OUT) -> list[str]:
    """The files git tracks, or would (`git add -A`: new files too, never ignored ones), but
    those under left_out."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and not name.startswith(left_out)]


def make_space(out: Path, root: Path = ROOT, streamlit: bool = False) -> Path:
    """Write the Space folder; returns it. The folder is replaced if it exists."""
    readme = (root / "README.md").read_text()
    header, metadata = space_metadata(readme, STREAMLIT_SECTION if streamlit else SECTION)
    app_file = root / ("Dockerfile" if streamlit else metadata["app_file"])
    if not app_file.is_file():
        raise ValueError(f"the Space's {app_file.name} does not exist")
    if out.exists():
        shutil.rmtree(out)
    for name in tracked_files(root):
        if name == "Dockerfile" and not streamlit:
            continue  # a Gradio Space is built by Hugging Face's own image
        if (root / name).is_file():  # a tracked file deleted in the working tree is skipped
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, out / name)
    if streamlit:
        (out / ".streamlit").mkdir(exist_ok=True)
        shutil.copy2(STREAMLIT_SETTINGS, out / ".streamlit" / "config.toml")
    else:
        (out / "requirements.txt").write_text(space_requirements(root))
    (out / "README.md").write_text(f"---\n{header}---\n\n{readme}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder to write (default: build/space[-streamlit])")
    parser.add_argument(
        "--streamlit", action="store_true", help="the Streamlit page as a Docker Space"
    )
    args = parser.parse_args()
    default = "space-streamlit" if args.streamlit else "space"
    out = make_space(Path(args.out or ROOT / "build" / default), streamlit=args.streamlit)
    files = sum(1 for path in out.rglob("*") if path.is_file())
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file()) / 2**20
    print(f"{out}: {files} files, {size:.0f} MiB")
    print(f"upload: hf upload USER/SPACE {out} . --repo-type space")


if __name__ == "__main__":
    main()
