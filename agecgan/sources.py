"""Labelled face sources (UTKFace, IMDB-WIKI wiki.mat, CSV) listed as (image path, age) records."""

import csv
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import scipy.io

# Rejection reasons shared by the sources, so reports and tests use the same words.
AGE_NOT_INTEGER = "age not an integer"
AGE_NOT_POSITIVE = "age <= 0"
FILE_MISSING = "file missing"
INVALID_DOB = "invalid date of birth"
NO_FACE = "no face found"
FACE_SCORE_LOW = "face score too low"
SECOND_FACE = "second face present"
AGE_OUT_OF_RANGE = "age out of range"

# ASCII digits only: int() would also accept " 7", "+7" or non-Latin digits.
_INTEGER = re.compile(r"-?[0-9]+")

# Matlab datenum 1 is 0000-01-01 and Python ordinal 1 is 0001-01-01: 366 days apart (year 0 is
# a leap year in the proleptic Gregorian calendar).
_DATENUM_OFFSET = 366
_WIKI_NUMBERS = ("dob", "photo_taken", "face_score", "second_face_score")


@dataclass(frozen=True)
class FaceRecord:
    """One labelled image: its absolute path and the age in whole years (>= 1)."""

    path: Path
    age: int


@dataclass
class SourceScan:
    """What a scan kept, what it rejected by reason, and how many entries it looked at."""

    records: list[FaceRecord]  # sorted by path, so every scan of the same data is identical
    rejected: dict[str, int]  # reason -> count, in the source's rule order, no zero counts
    total: int  # entries looked at: len(records) + sum(rejected.values())

    @property
    def kept(self) -> int:
        return len(self.records)


def _scan(records: list[FaceRecord], counts: Counter, reasons: tuple[str, ...]) -> SourceScan:
    records.sort(key=lambda record: (record.path, record.age))
    rejected = {reason: counts[reason] for reason in reasons if counts[reason]}
    return SourceScan(records, rejected, len(records) + sum(rejected.values()))


def _parse_age(text: str) -> int | str:
    """The age as an int, or the rejection reason."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        return AGE_NOT_INTEGER
    age = int(text)
    return age if age > 0 else AGE_NOT_POSITIVE


def scan_utkface(root: str | Path) -> SourceScan:
    """List UTKFace images, the age being the first `_` field of `[age]_[gender]_[race]_...jpg`."""
    root = Path(root).resolve()
    records, counts = [], Counter()
    with os.scandir(root) as entries:
        for entry in entries:
            if not (entry.name.lower().endswith(".jpg") and entry.is_file()):
                continue
            # Only the first field is read: three upstream names lack the gender field.
            age = _parse_age(entry.name.split("_", 1)[0])
            if isinstance(age, str):
                counts[age] += 1
            else:
                records.append(FaceRecord(root / entry.name, age))
    return _scan(records, counts, (AGE_NOT_INTEGER, AGE_NOT_POSITIVE))


def scan_csv(csv_path: str | Path, image_root: str | Path | None = None) -> SourceScan:
    """List the rows of a CSV with `path,age` columns; relative paths start at `image_root`."""
    csv_path = Path(csv_path)
    root = Path(image_root if image_root is not None else csv_path.parent).resolve()
    records, counts = [], Counter()
    # utf-8-sig: spreadsheets often save a byte-order mark that would rename the first column.
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        columns = [name.strip() for name in reader.fieldnames or []]
        missing = [name for name in ("path", "age") if name not in columns]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {', '.join(missing)}; "
                f"a header row with `path,age` is required, found {columns}"
            )
        reader.fieldnames = columns
        for row in reader:
            age = _parse_age(row["age"] or "")
            # normpath, not resolve: no file-system call per row, "a/../b" still collapses.
            path = Path(os.path.normpath(root / (row["path"] or "").strip()))
            if isinstance(age, str):
                counts[age] += 1
            elif not path.is_file():
                counts[FILE_MISSING] += 1
            else:
                records.append(FaceRecord(path, age))
    return _scan(records, counts, (AGE_NOT_INTEGER, AGE_NOT_POSITIVE, FILE_MISSING))


def _load_wiki(mat_path: str | Path) -> dict[str, np.ndarray | list[str]]:
    """The fields of the `wiki` struct, flattened to one value per entry."""
    mat = scipy.io.loadmat(mat_path)
    if "wiki" not in mat:
        raise ValueError(f"{mat_path}: no `wiki` struct, found {sorted(mat)}")
    struct = mat["wiki"][0, 0]
    missing = [name for name in (*_WIKI_NUMBERS, "full_path") if name not in struct.dtype.names]
    if missing:
        raise ValueError(f"{mat_path}: the `wiki` struct lacks field(s) {', '.join(missing)}")
    fields = {name: np.asarray(struct[name], dtype=np.float64).ravel() for name in _WIKI_NUMBERS}
    # A Matlab cell array of strings loads as an object array of 1-element string arrays.
    fields["full_path"] = [
        str(cell.ravel()[0]) if cell.size else "" for cell in struct["full_path"].ravel()
    ]
    if len({len(values) for values in fields.values()}) > 1:
        raise ValueError(f"{mat_path}: the `wiki` fields have different lengths")
    return fields


def _wiki_ages(dob: np.ndarray, photo_taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validity of each date of birth, and the age (NaN where it cannot be computed)."""
    ordinal = np.floor(dob) - _DATENUM_OFFSET  # the fraction of a datenum is the time of day
    valid = np.isfinite(ordinal) & (ordinal >= 1) & (ordinal <= date.max.toordinal())
    days = np.where(valid, ordinal, 1).astype(np.int64) - 1
    born = np.datetime64("0001-01-01", "D") + days.astype("timedelta64[D]")
    birth_year = born.astype("datetime64[Y]").astype(np.int64) + 1970
    birth_month = born.astype("datetime64[M]").astype(np.int64) % 12 + 1
    # The dataset authors assume each photo was taken mid-year: someone born in July or later
    # has not had that year's birthday yet.
    age = photo_taken - birth_year - (birth_month >= 7)
    return valid, np.where(valid, age, np.nan)


# A rule maps entry indices to a mask of the entries it removes.
_Rule = tuple[str, Callable[[np.ndarray], np.ndarray]]


def _wiki_rules(
    mat_path: str | Path,
    image_root: str | Path | None,
    *,
    min_face_score: float,
    allow_second_face: bool,
    min_age: int,
    max_age: int,
    require_file: bool,
) -> tuple[list[Path], np.ndarray, list[_Rule]]:
    """Image paths, ages and the active cleaning rules of a wiki.mat, in the order they apply."""
    if min_age < 1:
        raise ValueError(f"min_age must be >= 1 (ages <= 0 cannot be bucketed), got {min_age}")
    fields = _load_wiki(mat_path)
    root = Path(image_root if image_root is not None else Path(mat_path).parent).resolve()
    paths = [root / name for name in fields["full_path"]]
    valid_dob, age = _wiki_ages(fields["dob"], fields["photo_taken"])
    face_score = fields["face_score"]
    masks = [
        (INVALID_DOB, ~valid_dob),
        (NO_FACE, ~np.isfinite(face_score)),  # -inf is the authors' "no face detected"
        (FACE_SCORE_LOW, face_score < min_face_score),
    ]
    if not allow_second_face:
        # NaN is the authors' "no second face"; any score means another face is in the picture.
        masks.append((SECOND_FACE, ~np.isnan(fields["second_face_score"])))
    # NaN ages (invalid dates) compare False, so they count as out of range on their own.
    masks.append((AGE_OUT_OF_RANGE, ~((age >= min_age) & (age <= max_age))))
    rules: list[_Rule] = [(reason, lambda index, mask=mask: mask[index]) for reason, mask in masks]
    if require_file:
        # Checked per entry and only where asked: a stat per file is the slow part of a scan.
        rules.append(
            (FILE_MISSING, lambda index: np.array([not paths[i].is_file() for i in index], bool))
        )
    return paths, age, rules


def scan_wiki(
    mat_path: str | Path,
    image_root: str | Path | None = None,
    *,
    min_face_score: float = 1.0,
    allow_second_face: bool = False,
    min_age: int = 1,
    max_age: int = 100,
    require_file: bool = True,
) -> SourceScan:
    """List the IMDB-WIKI entries of a wiki.mat that pass the cleaning rules, applied in order.

    An entry removed by several rules is counted under the first. `image_root` defaults to the
    folder holding the .mat file.
    """
    paths, age, rules = _wiki_rules(
        mat_path,
        image_root,
        min_face_score=min_face_score,
        allow_second_face=allow_second_face,
        min_age=min_age,
        max_age=max_age,
        require_file=require_file,
    )
    remaining = np.arange(len(paths))
    counts = Counter()
    for reason, removes in rules:
        removed = removes(remaining)
        counts[reason] = int(removed.sum())
        remaining = remaining[~removed]
    records = [FaceRecord(paths[i], int(age[i])) for i in remaining]
    return _scan(records, counts, tuple(reason for reason, _ in rules))


def wiki_rule_table(
    mat_path: str | Path, image_root: str | Path | None = None, **options
) -> list[tuple[str, int, int]]:
    """Per rule of `scan_wiki`: (reason, removed in the cascade, removed applied alone)."""
    # Same defaults as scan_wiki; an unknown option is a TypeError from _wiki_rules.
    options = scan_wiki.__kwdefaults__ | options
    paths, _, rules = _wiki_rules(mat_path, image_root, **options)
    everyone = np.arange(len(paths))
    remaining = everyone
    table = []
    for reason, removes in rules:
        removed = removes(remaining)
        table.append((reason, int(removed.sum()), int(removes(everyone).sum())))
        remaining = remaining[~removed]
    return table


_SCANNERS = {"utkface": scan_utkface, "wiki": scan_wiki, "csv": scan_csv}


def scan_source(kind: str, path: str | Path, **options) -> SourceScan:
    """Scan a source by kind name: "utkface" (a folder), "wiki" (a wiki.mat) or "csv"."""
    if kind not in _SCANNERS:
        raise ValueError(f"unknown source kind {kind!r}; valid kinds: {', '.join(_SCANNERS)}")
    return _SCANNERS[kind](path, **options)


def format_rejections(scan: SourceScan) -> str:
    """A plain-text table of rejection counts by reason, then the kept and total lines."""
    rows = [*scan.rejected.items(), ("kept", scan.kept), ("total", scan.total)]
    width = max(len(reason) for reason, _ in rows)
    digits = max(len(f"{count:,}") for _, count in rows)
    lines = [f"{'reason':<{width}}  {'count':>{digits}}"]
    lines += [f"{reason:<{width}}  {count:>{digits},}" for reason, count in rows]
    return "\n".join(lines)
