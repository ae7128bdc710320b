"""Assemble the folder to upload as a Hugging Face Space: the tracked files, minus what a Space
does not run, and README.md with the Space metadata (the YAML block of the README's "Hugging
Face Space" section) as its front matter.

    python app/make_space.py [--out build/space]
    hf upload USER/SPACE build/space . --repo-type space

The Space installs requirements.txt (the same file `make demo` installs) and runs app/app.py,
which adds the repository root to sys.path, so agecgan needs no install step there.
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


def space_metadata(readme: str) -> tuple[str, dict]:
    """The YAML block that follows the README's Space heading: its text and its values."""
    section = readme.split(SECTION, 1)
    if len(section) != 2:
        raise ValueError(f"README.md has no '{SECTION}' section")
    match = re.search(r"```yaml\n(.*?)```", section[1], re.DOTALL)
    if match is None:
        raise ValueError(f"README.md's '{SECTION}' section has no ```yaml block")
    return match.group(1), yaml.safe_load(match.group(1))


def tracked_files(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and not name.startswith(LEFT_OUT)]


def make_space(out: Path, root: Path = ROOT) -> Path:
    """Write the Space folder; returns it. The folder is replaced if it exists."""
    readme = (root / "README.md").read_text()
    header, metadata = space_metadata(readme)
    if not (root / metadata["app_file"]).is_file():
        raise ValueError(f"the Space's app_file {metadata['app_file']} does not exist")
    if out.exists():
        shutil.rmtree(out)
    for name in tracked_files(root):
        if (root / name).is_file():  # a tracked file deleted in the working tree is skipped
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, out / name)
    (out / "README.md").write_text(f"---\n{header}---\n\n{readme}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "build" / "space"), help="folder to write")
    out = make_space(Path(parser.parse_args().out))
    files = sum(1 for path in out.rglob("*") if path.is_file())
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file()) / 2**20
    print(f"{out}: {files} files, {size:.0f} MiB")
    print(f"upload: hf upload USER/SPACE {out} . --repo-type space")


if __name__ == "__main__":
    main()
