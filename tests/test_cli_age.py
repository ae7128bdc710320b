"""`python -m agecgan age`: every input gets its own result files, and bad options end in
argparse's clear message and exit code 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, vivid_generator
from PIL import Image

from agecgan import BUCKET_LABELS, Encoder
from agecgan.__main__ import main, output_names
from agecgan.checkpoints import export_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory, aligner):  # aligner: the shared MTCNN, one thread
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    export_model(folder, TINY, encoder=Encoder(TINY), generator=vivid_generator())
    return folder


def files_of(out: Path, stem: str) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(f"{stem}_"))


def test_two_photos_with_one_name_keep_both_results(tmp_path, capsys, model, astronaut):
    a, b = tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg"
    a.parent.mkdir()
    b.parent.mkdir()
    Image.fromarray(astronaut).save(a, quality=95)
    Image.fromarray(astronaut).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b, quality=95)
    out = tmp_path / "out"
    argv = ["age", str(a), str(b), "--out", str(out), "--model", str(model), "--no-identity"]
    assert main([*argv, "--device", "cpu", "--frames", "4", "--size", "64"]) == 0
    expected = [
        *(f"age_{label}.png" for label in BUCKET_LABELS),
        *("grid.png", *(f"pasted_{label}.jpg" for label in BUCKET_LABELS), "progression.gif"),
    ]
    for stem in ("photo-1", "photo-2"):
        assert files_of(out, stem) == sorted(f"{stem}_{name}" for name in expected)
    assert not files_of(out, "photo")  # no unnumbered name for either
    # Each file holds its own photo's result: b is a mirror image, so the pasted photos differ.
    first = np.asarray(Image.open(out / "photo-1_pasted_60+.jpg"))
    second = np.asarray(Image.open(out / "photo-2_pasted_60+.jpg"))
    assert np.abs(first.astype(int) - second[:, ::-1].astype(int)).mean() < 20
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 20
    printed = capsys.readouterr().out
    assert f"{b}: wrote {out / 'photo-2'}_* (numbered: another photo has its name)" in printed


def test_output_names_never_repeat():
    assert output_names(["a/x.jpg", "b/y.png"]) == ["x", "y"]
    assert output_names(["a/x.jpg", "b/x.png", "x.gif"]) == ["x-1", "x-2", "x-3"]
    assert output_names(["x.jpg", "x.jpg"]) == ["x-1", "x-2"]  # the same file twice, too
    names = output_names(["a/x.jpg", "b/x.jpg", "x-1.jpg"])
    assert len(set(names)) == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--size", "0"], "argument --size: must be 1 or more, not 0"),
        (["--size", "big"], "argument --size: 'big' is not a whole number"),
        (["--frames", "0"], "argument --frames: must be 1 or more, not 0"),
        (["--identity-steps", "-1"], "argument --identity-steps: must be 0 or more, not -1"),
        (["--out", "FILE"], "--out FILE is a file, not a folder"),
        (["--out", "FILE/results"], "--out FILE/results cannot be written to: Not a directory"),
        (["--out", "/proc/agecgan-results"], "--out /proc/agecgan-results cannot be written to"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(tmp_path, options, message):
    (tmp_path / "FILE").write_text("not a folder\n")
    if "--out" not in options:
        options = [*options, "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "agecgan", "age", "photo.jpg", *options],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "python -m agecgan age: error: " in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr
    assert (tmp_path / "FILE").read_text() == "not a folder\n"  # untouched


def test_a_folder_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["age", "photo.jpg", "--out", "/proc/self/agecgan", "--model", str(tmp_path)])
    assert stop.value.code == 2
    assert "is not a model folder" not in capsys.readouterr().err  # refused first
