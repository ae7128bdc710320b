"""Tests of the evaluation's identity measures: verdicts of both networks, "both at once", the
thresholds at 1% false accepts, and the calibration on real photos."""

import numpy as np
import pytest
import torch

from agecgan import mobileface
from agecgan.calibrate import calibrate, calibration_markdown, impostor_scores, threshold_at
from agecgan.measures import Judge, both_at_once, both_at_once_pooled, identity_measure
from agecgan.prepare import save_cache

needs_mobileface = pytest.mark.skipif(
    bool(mobileface.missing_files()),
    reason=f"MobileFace is not installed: run {mobileface.INSTALL_HINT}",
)


def judge(higher_is_same: bool, threshold: float) -> Judge:
    """A judge whose embeddings are the vectors themselves."""
    return Judge("plain", torch.nn.Identity(), threshold, higher_is_same)


def test_verdicts_follow_each_networks_direction():
    cosine, dlib = judge(True, 0.5), judge(False, 0.6)
    assert cosine.same(np.array([0.4, 0.6])).tolist() == [False, True]
    assert dlib.same(np.array([0.4, 0.7])).tolist() == [True, False]
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    by_cosine = identity_measure(cosine, a, b)
    np.testing.assert_allclose(by_cosine["scores"], [1.0, 0.0, -1.0], atol=1e-6)
    assert by_cosine["verified"] == pytest.approx(1 / 3) and abs(by_cosine["mean"]) < 1e-6
    by_distance = identity_measure(dlib, a, b)
    np.testing.assert_allclose(by_distance["scores"], [1.0, 2**0.5, 8**0.5], atol=1e-6)
    assert by_distance["verified"] == 0.0


def test_both_at_once_counts_hits_of_other_buckets_only():
    # Three inputs of buckets 0, 1, 1; estimated bucket and MobileFace's verdict per target.
    inputs = np.array([0, 1, 1])
    estimated = np.array([[0, 0, 1], [1, 1, 1], [2, 0, 2], [3, 3, 3], [0, 0, 0], [5, 5, 4]])
    verified = np.ones((6, 3), bool)
    verified[3, 1] = verified[2, 2] = False
    shares = both_at_once(estimated, verified, inputs)
    # target 0: only the inputs of bucket 1 count; input 1 is hit. target 1: only input 0.
    # target 2: input 0 hit, input 2 in the bucket but not verified. target 3: 2 of 3.
    expected = [1 / 2, 1, 1 / 3, 2 / 3, 0, 2 / 3]
    np.testing.assert_allclose(shares, expected)
    # Pooled over the 3 * 6 - 3 (input, other target) pairs: 1 + 1 + 1 + 2 + 0 + 2 hits.
    assert both_at_once_pooled(estimated, verified, inputs) == pytest.approx(7 / 15)
    assert np.isnan(both_at_once(estimated[:2], verified[:2], np.zeros(3, int))[0])


def test_thresholds_accept_one_percent_of_different_people():
    scores = np.random.default_rng(0).normal(0.2, 0.1, 10_000)
    high = threshold_at(scores, 0.01, higher_is_same=True)
    low = threshold_at(scores, 0.01, higher_is_same=False)
    assert np.mean(scores > high) == pytest.approx(0.01, abs=1e-4)
    assert np.mean(scores < low) == pytest.approx(0.01, abs=1e-4)


@pytest.mark.parametrize("higher_is_same", [True, False])
def test_impostor_scores_are_every_pair_once(higher_is_same):
    embeddings = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    rule = judge(higher_is_same, 0.0)
    scores, pairs = impostor_scores(rule, embeddings)
    assert scores.shape == (10,) and pairs.shape == (2, 10) and (pairs[0] < pairs[1]).all()
    direct = rule.scores(embeddings[pairs[0]], embeddings[pairs[1]])
    np.testing.assert_allclose(scores, direct, atol=1e-5)


PEOPLE = {"astronaut": 45, "grace_hopper": 79, "camera": 40}  # ages for UTKFace-style names


@needs_mobileface
def test_calibration_on_real_photos(request, aligner, tmp_path):
    """Three people as a tiny prepared dataset with its originals (one original missing)."""
    from agecgan.align import read_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    faces, landmarks, names = [], [], []
    for person, age in PEOPLE.items():
        photo = read_photo(request.getfixturevalue(person))[0]
        name = f"{age}_1_0_{person}.png"
        photo.save(photos / name)
        aligned = aligner(photo)
        faces.append(np.asarray(aligned.image))
        landmarks.append(aligned.landmarks)
        names.append(name)
    faces.append(faces[0][:, ::-1])  # a fourth test face whose original is not there
    landmarks.append(landmarks[0])
    names.append("30_0_0_missing.png")
    save_cache(
        tmp_path / "faces.npz",
        images=np.stack(faces),
        ages=np.array([45, 79, 40, 30], np.int16),
        buckets=np.array([3, 5, 3, 2], np.int8),
        split=np.ones(4, np.int8),
        names=np.array(names),
        landmarks=np.stack(landmarks).astype(np.float32),
        framing=np.array([aligner.framing.scale, aligner.framing.eye_height], np.float32),
    )
    result = calibrate(tmp_path, photos, progress=False)
    assert result.faces == 3 and result.pairs == 3
    rows = {(row.network, row.pairs, round(row.threshold, 6)): row for row in result.rows}
    mf = result.thresholds["MobileFace"]
    different = rows[("MobileFace", "different faces, 64 px", round(mf, 6))]
    assert different.count == 3 and different.rate <= 1 / 3
    # The same face, as our 64 px crop and cut at full size, is the same person to both.
    same = rows[("MobileFace", "same face: 64 px crop vs full-size", round(mf, 6))]
    assert same.count == 3 and same.rate == 1.0 and same.mean_score > mf
    dlib_same = rows[("dlib", "same face: 64 px crop vs full-size", 0.6)]
    assert dlib_same.rate == 1.0
    assert 0.3 < result.outside["MobileFace's chip, in our 64 px crop"] < 0.7
    text = calibration_markdown(result, "python -m agecgan evaluate calibrate")
    assert "| MobileFace | same face: 64 px crop vs full-size |" in text
    assert f"{mf:.3f}" in text
    assert not result.held_out  # too few faces for two halves with pairs in each


def test_cli_says_how_to_install_mobileface(tmp_path, monkeypatch, capsys):
    from agecgan.__main__ import main
    from agecgan.evaluate import main as alias  # python -m agecgan.evaluate

    monkeypatch.setattr(mobileface, "FOLDER", tmp_path)  # an install folder without the files
    arguments = ["--model", str(tmp_path), "--data", str(tmp_path)]
    for kind in ("identity", "report"):
        assert main(["evaluate", kind, *arguments]) == 2
        assert "make install-all" in capsys.readouterr().err
        assert alias([kind, *arguments]) == 2
        assert "make install-all" in capsys.readouterr().err
