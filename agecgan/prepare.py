"""Turn a labelled source into a cached dataset of aligned 64x64 faces, once.

Every image goes through align_face's detector and template, in parallel worker processes.
An image that cannot be read or holds no face is dropped together with its label and counted.
The cache is one .npz file (images, ages, buckets, split, names side by side, so they cannot
drift apart), written atomically; loading it for training takes about a second.
"""

import hashlib
import io
import json
import multiprocessing
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from agecgan.ages import BUCKET_LABELS, age_to_bucket
from agecgan.align import (
    DEFAULT_FRAMING,
    FACE_SIZE,
    LEGACY_FRAMING,
    FaceAligner,
    FaceNotFoundError,
    Framing,
    ImageReadError,
    outside_share,
    read_photo,
)
from agecgan.checkpoints import atomic_write
from agecgan.sources import SourceScan

CACHE_NAME = "faces.npz"
PACK_NAME = "faces-pack.npz"  # write_pack's compact copy, for moving the data with the code
PACK_QUALITY = 90  # UTKFace: 54.7 MiB (faces.npz: 280 MiB), 1.7 grey levels off on average
REPORT_NAME = "prepare_report.json"
UNREADABLE = "unreadable image"
NO_FACE = "no face detected"
SPLITS = ("train", "test")
TEST_FRACTION_PERCENT = 10  # about 90/10 train/test


def split_of(name: str) -> str:
    """Deterministic train/test split from a hash of the file name: never changes between runs."""
    digest = hashlib.sha256(Path(name).name.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    return "test" if bucket < TEST_FRACTION_PERCENT else "train"


_worker_aligner: FaceAligner | None = None


def _init_worker() -> None:
    global _worker_aligner
    torch.set_num_threads(1)  # one core per worker process; the workers use all of them
    _worker_aligner = FaceAligner(size=FACE_SIZE)


def _align_one(path: str) -> tuple[np.ndarray | None, np.ndarray | None, float, str | None]:
    """One image -> (face, landmarks, share of the face outside the image, reason dropped)."""
    try:
        image, _ = read_photo(path)
        face = _worker_aligner(image)
    except ImageReadError:
        return None, None, 0.0, UNREADABLE
    except FaceNotFoundError:
        return None, None, 0.0, NO_FACE
    return np.asarray(face.image), face.landmarks, outside_share(face.matrix, image.size), None


@dataclass
class PrepareReport:
    """What prepare kept and dropped, and how long it took."""

    source: str
    total: int  # entries the source listed
    kept: int
    rejected: dict[str, int]  # reason -> count: the source's label rules, then ours
    per_split: dict[str, int]
    per_bucket: dict[str, int]
    outside_mean: float  # mean share of a kept face's pixels that lie outside its image
    outside_over_1pct: int  # kept faces with more than 1% of their pixels outside the image
    seconds: float
    workers: int

    def table(self) -> str:
        rows = [("entries listed", self.total)]
        rows += [(f"dropped: {reason}", count) for reason, count in self.rejected.items()]
        rows += [("kept", self.kept)]
        rows += [(f"  {split}", count) for split, count in self.per_split.items()]
        rows += [(f"  ages {label}", count) for label, count in self.per_bucket.items()]
        rows += [("faces >1% outside the image", self.outside_over_1pct)]
        width = max(len(label) for label, _ in rows)
        lines = [f"{label:<{width}}  {count:>7,}" for label, count in rows]
        lines.append(
            f"{'pixels outside the image':<{width}}  {self.outside_mean:>7.2%} of a face, mean "
            "(filled by border replication)"
        )
        lines.append(
            f"{self.seconds:.1f} s with {self.workers} workers "
            f"({self.total / max(self.seconds, 1e-9):.1f} images/s)"
        )
        return "\n".join(lines)


def prepare(
    scan: SourceScan,
    out_dir: str | Path,
    *,
    source: str = "",
    workers: int | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Detect, align and cache every record of `scan` into out_dir/faces.npz."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    paths = [str(record.path) for record in scan.records]
    faces = np.empty((len(paths), FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)
    landmarks = np.zeros((len(paths), 5, 2), dtype=np.float32)
    outside = np.zeros(len(paths), dtype=np.float32)
    keep = np.zeros(len(paths), dtype=bool)
    rejected = dict(scan.rejected)
    start = time.perf_counter()
    # spawn, not fork: forking a process that has already run torch can deadlock its OpenMP pool
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        results = pool.imap(_align_one, paths, chunksize=8)  # in order: labels stay with images
        bar = tqdm(
            results,
            total=len(paths),
            desc="align",
            unit="img",
            disable=not progress,
            mininterval=1.0,
        )
        for index, (face, points, share, reason) in enumerate(bar):
            if face is None:
                rejected[reason] = rejected.get(reason, 0) + 1
            else:
                faces[index], landmarks[index], outside[index] = face, points, share
                keep[index] = True
    seconds = time.perf_counter() - start

    kept_records = [record for record, ok in zip(scan.records, keep, strict=True) if ok]
    names = np.array([record.path.name for record in kept_records], dtype=str)
    ages = np.array([record.age for record in kept_records], dtype=np.int16)
    buckets = np.array([age_to_bucket(int(age)) for age in ages], dtype=np.int8)
    split = np.array([SPLITS.index(split_of(name)) for name in names], dtype=np.int8)
    save_cache(
        out_dir / CACHE_NAME,
        images=faces[keep],
        ages=ages,
        buckets=buckets,
        split=split,
        names=names,
        landmarks=landmarks[keep],  # in the source image's pixels: the framing can be re-measured
        outside=outside[keep],
        framing=np.array([DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height], np.float32),
    )

    report = PrepareReport(
        source=source,
        total=scan.total,
        kept=int(keep.sum()),
        rejected=rejected,
        per_split={name: int((split == i).sum()) for i, name in enumerate(SPLITS)},
        per_bucket={label: int((buckets == i).sum()) for i, label in enumerate(BUCKET_LABELS)},
        outside_mean=float(outside[keep].mean()) if keep.any() else 0.0,
        outside_over_1pct=int((outside[keep] > 0.01).sum()),
        seconds=seconds,
        workers=workers,
    )
    with atomic_write(out_dir / REPORT_NAME) as tmp:
        tmp.write_text(json.dumps(report.__dict__, indent=2))
    return report


def save_cache(path: Path, **arrays: np.ndarray) -> None:
    """Write the arrays as one .npz, atomically: a killed run leaves the old file or none."""
    with atomic_write(path) as tmp:
        np.savez(tmp, **arrays)


def write_pack(cache: str | Path, pack: str | Path, quality: int = PACK_QUALITY) -> int:
    """The prepared cache as a compact pack: every face JPEG-coded (4:4:4) into one array, beside
    the same labels, written atomically; training reads either. Returns the pack's bytes."""
    with np.load(Path(cache) / CACHE_NAME if Path(cache).is_dir() else cache) as arrays:
        arrays = {key: arrays[key] for key in arrays.files}
    codes = []
    for face in arrays.pop("images"):
        buffer = io.BytesIO()
        Image.fromarray(face).save(buffer, "JPEG", quality=quality, subsampling=0)
        codes.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(code) for code in codes]).astype(np.int64)
    save_cache(Path(pack), jpeg=np.concatenate(codes), offsets=offsets, **arrays)
    return Path(pack).stat().st_size


def _decode_pack(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    faces = [
        np.asarray(Image.open(io.BytesIO(jpeg[start:end].tobytes())).convert("RGB"))
        for start, end in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    return np.stack(faces) if faces else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.uint8)


@dataclass
class FaceDataset:
    """An in-memory split of a prepared cache: uint8 faces (N, 64, 64, 3) and their buckets."""

    images: torch.Tensor  # (N, 64, 64, 3) uint8
    buckets: torch.Tensor  # (N,) int64, 0..5
    ages: torch.Tensor  # (N,) int64
    names: list[str]
    framing: Framing  # how the faces were cut (caches from before it was recorded: the legacy)

    def __len__(self) -> int:
        return len(self.buckets)

    @classmethod
    def load(cls, path: str | Path, split: str | None = "train") -> "FaceDataset":
        """Load a prepared cache (its folder, its .npz, or a pack of it); split None keeps
        everything."""
        path = Path(path)
        if path.is_dir():
            path = path / CACHE_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"no prepared dataset at {path}: run `python -m agecgan prepare` first"
            )
        try:
            with np.load(path, allow_pickle=False) as cache:
                labels = ("ages", "buckets", "split", "names")
                arrays = {key: cache[key] for key in labels}
                if "jpeg" in cache.files:  # a pack (write_pack)
                    arrays["images"] = _decode_pack(cache["jpeg"], cache["offsets"])
                else:
                    arrays["images"] = cache["images"]
                framing = (
                    Framing(*(round(float(v), 4) for v in cache["framing"]))
                    if "framing" in cache.files
                    else LEGACY_FRAMING
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
            raise ValueError(
                f"corrupt dataset {path} ({error}): run `python -m agecgan prepare` again"
            ) from error
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"corrupt dataset {path}: arrays of different lengths {lengths}")
        chosen = slice(None) if split is None else arrays["split"] == SPLITS.index(split)
        return cls(
            images=torch.from_numpy(np.ascontiguousarray(arrays["images"][chosen])),
            buckets=torch.from_numpy(arrays["buckets"][chosen].astype(np.int64)),
            ages=torch.from_numpy(arrays["ages"][chosen].astype(np.int64)),
            names=arrays["names"][chosen].tolist(),
            framing=framing,
        )
