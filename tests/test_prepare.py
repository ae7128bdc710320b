"""Tests of dataset preparation: a UTKFace-shaped folder of real photos, the cache and the CLI."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import agecgan.prepare as prepare_module
from agecgan.align import DEFAULT_FRAMING
from agecgan.networks import to_model_range, to_uint8
from agecgan.prepare import (
    FaceDataset,
    prepare,
    save_cache,
    split_of,
    write_pack,
)
from agecgan.sources import scan_utkface

ROOT = Path(__file__).resolve().parents[1]
WIKI_MAT = ROOT.parent / "shared" / "data" / "wiki_crop" / "wiki.mat"
# The faces that prepare must keep, by the age their file name carries.
KEPT = {
    "35_1_0_20170101000000002.jpg.chip.jpg": 35,  # astronaut
    "40_0_0_20170101000000003.jpg.chip.jpg": 40,  # camera
    "61_1_0_20170101000000005.jpg.chip.jpg": 61,  # Grace Hopper
}
CORRUPT = "25_0_0_20170101000000001.jpg.chip.jpg"  # sorts first: labels would shift after it
NO_FACE = "50_1_0_20170101000000004.jpg.chip.jpg"
BAD_NAME = "abc_1_0_20170101000000006.jpg.chip.jpg"


@pytest.fixture(scope="module")
def utkface(tmp_path_factory, astronaut, camera, grace_hopper) -> Path:
    """A UTKFace-shaped folder: three real faces, a corrupt file, a faceless one, a bad name."""
    folder = tmp_path_factory.mktemp("utkface")
    names = list(KEPT)
    Image.fromarray(astronaut).save(folder / names[0], quality=95)
    Image.fromarray(camera).save(folder / names[1], quality=95)
    shutil.copy(grace_hopper, folder / names[2])
    (folder / CORRUPT).write_bytes(b"\xff\xd8 not really a jpeg" * 20)
    Image.new("RGB", (200, 200), (150, 120, 100)).save(folder / NO_FACE)
    shutil.copy(grace_hopper, folder / BAD_NAME)
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, utkface):
    """prepare() run once over the folder with two worker processes: (out folder, report)."""
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(scan_utkface(utkface), out, workers=2, progress=False)


def test_report_counts_kept_and_rejected(prepared):
    _, report = prepared
    assert report.total == 6 and report.kept == 3
    assert report.rejected == {
        "age not an integer": 1,
        "unreadable image": 1,
        "no face detected": 1,
    }
    assert report.per_bucket == {
        "0-18": 0,
        "19-29": 0,
        "30-39": 1,
        "40-49": 1,
        "50-59": 0,
        "60+": 1,
    }
    assert sum(report.per_split.values()) == 3
    assert report.per_split["test"] == sum(split_of(name) == "test" for name in KEPT)


def test_report_json_is_written(prepared):
    out, report = prepared
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["kept"] == 3 and saved["rejected"] == report.rejected


def test_cache_faces_stay_with_their_ages(prepared, utkface, aligner):
    out, _ = prepared
    dataset = FaceDataset.load(out, split=None)
    assert dict(zip(dataset.names, dataset.ages.tolist(), strict=True)) == KEPT
    expected = [np.asarray(aligner(utkface / name).image, np.int16) for name in dataset.names]
    for index, image in enumerate(dataset.images.numpy().astype(np.int16)):
        errors = [np.abs(image - other).mean() for other in expected]
        assert errors[index] < 1.0  # the same face (up to thread-count rounding)...
        assert np.argmin(errors) == index  # ...and no other face is closer


def test_split_of_is_deterministic_and_uses_the_file_name_only():
    name = "23_0_2_20170116174525125.jpg.chip.jpg"
    assert split_of(name) == split_of(name) in ("train", "test")
    assert split_of(f"/data/UTKFace/{name}") == split_of(f"elsewhere/{name}") == split_of(name)


def test_split_of_sends_about_a_tenth_to_test():
    names = [f"{i % 100 + 1}_{i % 2}_{i % 5}_2017{i:08d}.jpg.chip.jpg" for i in range(10_000)]
    fraction = np.mean([split_of(name) == "test" for name in names])
    assert 0.08 <= fraction <= 0.12


def test_dataset_splits_add_up(prepared):
    out, _ = prepared
    everything = FaceDataset.load(out / "faces.npz", split=None)
    train, test = FaceDataset.load(out, "train"), FaceDataset.load(out, "test")
    assert len(everything) == 3 and len(train) + len(test) == 3
    assert all(split_of(name) == "test" for name in test.names)
    assert everything.images.shape == (3, 64, 64, 3) and everything.images.dtype == torch.uint8
    assert set(everything.buckets.tolist()) == {2, 3, 5}


def test_dataset_missing_cache_says_run_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare"):
        FaceDataset.load(tmp_path)


def test_dataset_with_arrays_of_different_lengths_is_refused(tmp_path):
    save_cache(
        tmp_path / "faces.npz",
        images=np.zeros((2, 64, 64, 3), np.uint8),
        ages=np.array([20, 30, 40], np.int16),
        buckets=np.array([1, 2, 3], np.int8),
        split=np.zeros(3, np.int8),
        names=np.array(["a.jpg", "b.jpg", "c.jpg"]),
    )
    with pytest.raises(ValueError, match="different lengths"):
        FaceDataset.load(tmp_path, split=None)


def test_model_range_round_trip():
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    images[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    faces = to_model_range(images)
    assert faces.shape == (4, 3, 8, 8) and faces.dtype == torch.float32
    assert faces.min() == -1.0 and faces.max() == 1.0
    assert torch.equal(to_uint8(faces), images)


def test_to_uint8_clamps_out_of_range():
    faces = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert to_uint8(faces)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_tiny_image_is_counted_not_fatal(tmp_path, aligner, monkeypatch):
    path = tmp_path / "30_0_0_tiny.jpg"
    Image.new("RGB", (16, 16), (90, 60, 40)).save(path)
    monkeypatch.setattr(prepare_module, "_worker_aligner", aligner)  # what a worker holds
    assert prepare_module._align_one(str(path)) == (None, None, 0.0, "no face detected")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "agecgan", "prepare", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_cli_prepares_a_utkface_folder(utkface, tmp_path):
    result = run_cli("utkface", str(utkface), "--out", str(tmp_path), "--workers", "1", "--pack")
    assert result.returncode == 0, result.stderr
    assert FaceDataset.load(tmp_path / "faces-pack.npz", split=None).names == (
        FaceDataset.load(tmp_path, split=None).names
    )
    lines = result.stdout.splitlines()
    assert any(line.split() == ["kept", "3"] for line in lines), result.stdout
    assert any(line.split() == ["dropped:", "no", "face", "detected", "1"] for line in lines)
    assert len(FaceDataset.load(tmp_path, split=None)) == 3


@pytest.mark.slow
def test_cli_wiki_prints_rules_and_finds_nothing_to_prepare(tmp_path):
    if not WIKI_MAT.is_file():
        pytest.skip("real wiki.mat not present in ../shared/data")
    result = run_cli("wiki", str(WIKI_MAT), "--out", str(tmp_path))
    assert result.returncode == 1
    assert "nothing to prepare" in result.stderr
    rule = next(line for line in result.stdout.splitlines() if "no face found" in line)
    assert "18,016" in rule
    assert not (tmp_path / "faces.npz").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing-array"])
def test_corrupt_cache_is_a_clear_error(tmp_path, damage):
    arrays = dict(
        images=np.zeros((3, 64, 64, 3), np.uint8),
        ages=np.array([20, 30, 40], np.int16),
        buckets=np.array([1, 2, 3], np.int8),
        split=np.zeros(3, np.int8),
        names=np.array(["a.jpg", "b.jpg", "c.jpg"]),
    )
    if damage == "missing-array":
        del arrays["ages"]
    save_cache(tmp_path / "faces.npz", **arrays)
    data = (tmp_path / "faces.npz").read_bytes()
    if damage == "truncated":
        (tmp_path / "faces.npz").write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        (tmp_path / "faces.npz").write_bytes(b"not a zip file" * 100)
    with pytest.raises(ValueError, match="corrupt dataset.*prepare"):
        FaceDataset.load(tmp_path, split=None)


def test_prepare_records_the_framing_and_how_much_of_each_face_was_invented(prepared):
    prepared, report = prepared
    with np.load(prepared / "faces.npz") as cache:
        outside, landmarks, framing = cache["outside"], cache["landmarks"], cache["framing"]
    assert framing.tolist() == pytest.approx([DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height])
    assert FaceDataset.load(prepared, split=None).framing == DEFAULT_FRAMING
    assert landmarks.shape == (len(outside), 5, 2)
    assert outside.min() >= 0 and outside.max() < 0.05  # whole photos: the faces lie inside
    assert report.outside_mean == pytest.approx(float(outside.mean()))
    assert "pixels outside the image" in report.table()


def test_outside_share_counts_what_border_replication_invents():
    from agecgan.align import outside_share

    inside = np.array([[0.5, 0, -10], [0, 0.5, -10]], np.float32)  # photo 20..148 px: inside
    assert outside_share(inside, (200, 200)) == 0.0
    left_half_out = np.array([[0.5, 0, 32], [0, 0.5, 0]], np.float32)  # photo x 0 at crop x 32
    assert outside_share(left_half_out, (400, 400)) == pytest.approx(0.5, abs=0.01)


def test_a_pack_holds_the_same_faces_and_labels_in_fewer_bytes(prepared, tmp_path):
    prepared, _ = prepared
    size = write_pack(prepared, tmp_path / "faces-pack.npz")
    assert size < 0.5 * (prepared / "faces.npz").stat().st_size  # three faces; 23k: see README
    cache, pack = (
        FaceDataset.load(prepared, None),
        FaceDataset.load(tmp_path / "faces-pack.npz", None),
    )
    assert pack.names == cache.names and pack.framing == cache.framing
    assert torch.equal(pack.buckets, cache.buckets) and torch.equal(pack.ages, cache.ages)
    error = (pack.images.float() - cache.images.float()).abs().mean().item()
    assert 0 < error < 2.5  # JPEG at quality 90, 4:4:4: one or two grey levels per pixel
