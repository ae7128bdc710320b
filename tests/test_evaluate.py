"""python -m agecgan.evaluate identity on a tiny model folder and a tiny prepared dataset."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from helpers import TINY

from agecgan import Encoder, Generator
from agecgan.checkpoints import export_model
from agecgan.evaluate import evaluate_identity, identity_table
from agecgan.prepare import save_cache

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = tmp_path / "model"
    export_model(model, TINY, encoder=Encoder(TINY).eval(), generator=Generator(TINY).eval())
    rng = np.random.default_rng(0)
    count = 6
    save_cache(
        tmp_path / "faces.npz",
        images=rng.integers(0, 256, (count, 64, 64, 3), np.uint8),
        ages=np.full(count, 30, np.int16),
        buckets=np.full(count, 2, np.int8),
        split=np.ones(count, np.int8),
        names=np.array([f"{i}.jpg" for i in range(count)]),
    )
    return model, tmp_path


def test_identity_rows_cover_every_method(tmp_path):
    model, data = make_inputs(tmp_path)
    rows = evaluate_identity(
        model, data, finetuned=model, limit=4, batch_size=3, steps=2, progress=False
    )
    assert [row.method for row in rows] == ["z0", "pixelwise", "identity", "finetuned"]
    for row in rows:
        assert row.count == 4 and 0 <= row.verified <= 1 and row.mean_distance > 0
        assert row.seconds_per_image > 0
    # The fine-tuned model here is the same model: the same reconstructions as z0.
    assert abs(rows[3].mean_distance - rows[0].mean_distance) < 1e-5
    # Identity-preserving optimization is at least as close to the person as z0.
    assert rows[2].mean_distance <= rows[0].mean_distance
    table = identity_table(rows, steps=2)
    assert "82.9%" in table and "identity-preserving optimization, 2 steps" in table


def test_cli_writes_the_table(tmp_path):
    model, data = make_inputs(tmp_path)
    out = tmp_path / "identity.md"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "agecgan.evaluate",
            "identity",
            "--model",
            str(model),
            "--data",
            str(data),
            "--limit",
            "2",
            "--steps",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "verified at 0.6" in out.read_text() and "z0 = E(x)" in result.stdout
