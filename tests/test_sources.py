"""Tests of the labelled face sources: UTKFace names, wiki.mat cleaning rules, CSV lists."""

from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from agecgan.ages import age_to_bucket
from agecgan.sources import (
    FaceRecord,
    format_rejections,
    scan_csv,
    scan_source,
    scan_utkface,
    scan_wiki,
    wiki_rule_table,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"")


def test_utkface_reads_age_from_first_field(tmp_path):
    touch(
        tmp_path,
        "25_0_1_20170116174525125.jpg.chip.jpg",
        "39_1_20170116174525125.jpg.chip.jpg",  # upstream name without the gender field
        "abc_0_0_x.jpg.chip.jpg",
        "0_1_2_20170116174525125.jpg.chip.jpg",
        "7_1_2_notes.txt",
    )
    scan = scan_utkface(tmp_path)
    assert scan.records == [
        FaceRecord(tmp_path.resolve() / "25_0_1_20170116174525125.jpg.chip.jpg", 25),
        FaceRecord(tmp_path.resolve() / "39_1_20170116174525125.jpg.chip.jpg", 39),
    ]
    assert scan.rejected == {"age not an integer": 1, "age <= 0": 1}
    assert scan.total == 4


def test_utkface_odd_names_never_crash(tmp_path):
    touch(tmp_path, ".jpg", "_.jpg", "-3_0_0.jpg", "٣_0_0.jpg", "4a_0_0.jpg", "5_0_0.JPG")
    (tmp_path / "6_0_0.jpg").mkdir()  # a folder with an image's name is not an image
    scan = scan_utkface(tmp_path)
    assert [record.age for record in scan.records] == [5]
    assert scan.rejected == {"age not an integer": 4, "age <= 0": 1}


@pytest.mark.slow
def test_real_utkface_histogram():
    if not (DATA / "UTKFace").is_dir():
        pytest.skip("real UTKFace data not present")
    scan = scan_utkface(DATA / "UTKFace")
    assert scan.total == len(scan.records) == 23_707
    histogram = Counter(age_to_bucket(record.age) for record in scan.records)
    assert [histogram[bucket] for bucket in range(6)] == [4494, 7442, 4537, 2245, 2299, 2690]


def datenum(year: int, month: int, day: int) -> int:
    """Matlab serial date number of a day."""
    return date(year, month, day).toordinal() + 366


def write_wiki(folder: Path, entries: list[dict]) -> Path:
    """A wiki.mat with the real file's layout: a 1x1 struct of 1xN fields, paths in a cell."""
    full_path = np.empty((1, len(entries)), dtype=object)
    full_path[0, :] = [entry["path"] for entry in entries]

    def row(key: str, default: float) -> np.ndarray:
        return np.array([[entry.get(key, default) for entry in entries]], dtype=np.float64)

    wiki = {
        "dob": row("dob", 0),
        "photo_taken": row("taken", 2000),
        "full_path": full_path,
        "gender": row("gender", 1.0),
        "name": full_path,
        "face_location": full_path,
        "face_score": row("score", 3.0),
        "second_face_score": row("second", np.nan),
    }
    mat_path = folder / "wiki.mat"
    scipy.io.savemat(mat_path, {"wiki": wiki})
    return mat_path


@pytest.fixture
def wiki_crop(tmp_path):
    """A wiki_crop-shaped folder: two real images, one listed image absent, one per rule."""
    folder = tmp_path / "wiki_crop"
    (folder / "00").mkdir(parents=True)
    for name in ("00/july.jpg", "00/june.jpg"):
        Image.new("RGB", (8, 8), "gray").save(folder / name)
    born = datenum(1980, 6, 30)
    mat_path = write_wiki(
        folder,
        [
            {"path": "00/july.jpg", "dob": datenum(1980, 7, 1)},  # 2000 - 1980 - 1 = 19
            {"path": "00/june.jpg", "dob": born},  # 2000 - 1980 = 20
            {"path": "00/bad_dob.jpg", "dob": 5},
            {"path": "00/no_face.jpg", "dob": born, "score": -np.inf},
            {"path": "00/low.jpg", "dob": born, "score": 0.5},
            {"path": "00/second.jpg", "dob": born, "second": 2.0},
            {"path": "00/unborn.jpg", "dob": datenum(2001, 1, 1)},
            {"path": "00/absent.jpg", "dob": born},
        ],
    )
    return mat_path


def test_wiki_applies_every_rule_in_order(wiki_crop):
    scan = scan_wiki(wiki_crop)
    root = wiki_crop.parent.resolve()
    assert scan.records == [
        FaceRecord(root / "00/july.jpg", 19),
        FaceRecord(root / "00/june.jpg", 20),
    ]
    assert scan.rejected == {
        "invalid date of birth": 1,
        "no face found": 1,
        "face score too low": 1,
        "second face present": 1,
        "age out of range": 1,
        "file missing": 1,
    }
    assert scan.total == 8


def test_wiki_options_relax_rules(wiki_crop):
    scan = scan_wiki(wiki_crop, allow_second_face=True, require_file=False, min_face_score=0.1)
    kept = {record.path.name: record.age for record in scan.records}
    assert kept == {
        "july.jpg": 19,
        "june.jpg": 20,
        "low.jpg": 20,
        "second.jpg": 20,
        "absent.jpg": 20,
    }
    assert scan.rejected == {"invalid date of birth": 1, "no face found": 1, "age out of range": 1}
    with pytest.raises(ValueError, match="min_age"):
        scan_wiki(wiki_crop, min_age=0)


def test_wiki_rule_table_counts_cascade_and_alone(wiki_crop):
    table = {reason: (cascade, alone) for reason, cascade, alone in wiki_rule_table(wiki_crop)}
    # Alone, the score threshold also catches -inf, and the age rule the undatable entry.
    assert table["face score too low"] == (1, 2)
    assert table["age out of range"] == (1, 2)
    assert table["file missing"] == (1, 6)
    assert sum(cascade for cascade, _ in table.values()) == 6


@pytest.mark.slow
def test_real_wiki_mat():
    mat_path = DATA / "wiki_crop" / "wiki.mat"
    if not mat_path.is_file():
        pytest.skip("real wiki.mat not present")
    scan = scan_wiki(mat_path, require_file=False)
    assert len(scan.records) + sum(scan.rejected.values()) == scan.total == 62_328
    first = mat_path.parent.resolve() / "17" / "10000217_1981-05-05_2009.jpg"
    assert {record.path: record.age for record in scan.records}[first] == 2009 - 1981

    table = wiki_rule_table(mat_path, require_file=False)
    assert scan.rejected == {reason: cascade for reason, cascade, _ in table if cascade}
    alone = {reason: count for reason, _, count in table}
    assert alone["no face found"] == scan.rejected["no face found"] == 18_016
    assert alone["second face present"] == 62_328 - 58_232


def test_csv_keeps_good_rows_and_counts_bad_ones(tmp_path):
    touch(tmp_path, "a.jpg", "b.jpg")
    (tmp_path / "labels.csv").write_text(
        "path,age,note\n"
        "a.jpg,31,ok\n"
        f"{tmp_path / 'b.jpg'},8,absolute\n"
        "a.jpg,thirty,\n"
        "a.jpg,0,\n"
        "gone.jpg,40,\n"
    )
    scan = scan_source("csv", tmp_path / "labels.csv")
    root = tmp_path.resolve()
    assert scan.records == [FaceRecord(root / "a.jpg", 31), FaceRecord(root / "b.jpg", 8)]
    assert scan.rejected == {"age not an integer": 1, "age <= 0": 1, "file missing": 1}
    assert scan.total == 5


def test_csv_image_root_and_missing_column(tmp_path):
    (tmp_path / "images").mkdir()
    touch(tmp_path / "images", "a.jpg")
    (tmp_path / "labels.csv").write_text("age,path\n44,a.jpg\n")
    assert scan_csv(tmp_path / "labels.csv", tmp_path / "images").records[0].age == 44
    (tmp_path / "bad.csv").write_text("file,age\na.jpg,44\n")
    with pytest.raises(ValueError, match="path"):
        scan_csv(tmp_path / "bad.csv")


def test_scan_source_rejects_unknown_kind():
    with pytest.raises(ValueError, match="utkface, wiki, csv"):
        scan_source("imdb", "anywhere")


def test_format_rejections_lists_reasons_then_totals(tmp_path):
    touch(tmp_path, "3_0_0.jpg", "x_0_0.jpg")
    lines = format_rejections(scan_utkface(tmp_path)).splitlines()
    assert lines[0].split() == ["reason", "count"]
    assert lines[1].endswith("1") and lines[1].startswith("age not an integer")
    assert lines[-2].split() == ["kept", "1"]
    assert lines[-1].split() == ["total", "2"]
