"""The evaluation's measures, on any faces: two identity judges, "both at once", age accuracy
and FID/KID per target bucket, and the data that holds them (AgingEvaluation).

Every measure takes faces it is given, uint8 and aligned as agecgan.align cuts them, and knows
nothing of model folders or of where the faces came from:

    measure_faces(inputs, input_buckets, faces, reference, estimator, inception, fr=fr,
                  independent=independent, label="mode A")

inputs (N, 64, 64, 3), input_buckets (N,), faces (N, 7, 64, 64, 3): each input's
reconstruction, then its six aged faces, youngest bucket first. measure_aging measures six aged
faces alone (G from random z has no input to keep). From latents: aged_faces gives G(z, y_b)
for every bucket, with_reconstruction puts the face at each input's own bucket first, and
measure_faces measures them.
"""

import hashlib
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agecgan import mobileface
from agecgan.ages import NUM_BUCKETS, one_hot
from agecgan.align import DEFAULT_FRAMING, Framing
from agecgan.checkpoints import atomic_write
from agecgan.face_recognition import SAME_PERSON_THRESHOLD, FaceRecognizer, distance
from agecgan.mobileface import MobileFaceRecognizer
from agecgan.networks import to_model_range, to_uint8
from agecgan.prepare import FaceDataset

REFERENCE_NAME = "evaluation_reference.npz"
KID_SUBSET = 100  # faces per KID subset: small enough for the smallest real bucket
UNCHANGED = "photo unchanged"


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


# ---- what the measures return ----------------------------------------------------------------


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
    model: str  # what aged the faces: a model folder, a mode, the unchanged photo
    source: str  # where its inputs came from: "test" (real test faces), "random" (z ~ N(0, I))
    count: int  # faces per target bucket
    rows: list[BucketRow]
    fid: float  # all aged faces (an equal share of each bucket) against all real test faces
    kid: float
    floor_fid: float  # real against real: two halves of the test split
    floor_kid: float
    # The reconstruction (the input at its own bucket, G(E(x), true y) for a model): dlib's
    # verified, mean_distance, distances (per face); MobileFace's mobileface_verified,
    # mobileface_similarity, similarities (per face). Empty without inputs.
    reconstruction: dict = field(default_factory=dict)
    seconds: float = 0.0
    identity_steps: int = 0  # z = E(x) optimized for identity first
    # All (input, other-bucket target) pairs: aged face in the target bucket AND verified by
    # MobileFace, at mobileface_threshold.
    both_at_once: float | None = None
    mobileface_threshold: float | None = None


@dataclass
class AgedFaces:
    """One way of aging, measured: the numbers and the faces they were measured on."""

    evaluation: AgingEvaluation
    inputs: np.ndarray  # (N, 64, 64, 3) uint8 test faces
    faces: np.ndarray  # (N, 7, 64, 64, 3) uint8: reconstruction, then the six buckets


@dataclass
class IdentityRow:
    method: str
    verified: float  # fraction of (input, reconstruction) pairs within SAME_PERSON_THRESHOLD
    mean_distance: float
    seconds_per_image: float
    count: int
    mobileface_verified: float = float("nan")  # ... above MobileFace's calibrated threshold
    mobileface_similarity: float = float("nan")  # mean cosine similarity by MobileFace


# ---- the real test faces ---------------------------------------------------------------------


def load_measures(framing: Framing = DEFAULT_FRAMING):
    """The age estimator (for faces cut with `framing`) and the FID Inception network
    (requirements-eval*.txt)."""
    from agecgan.age_estimator import AgeEstimator
    from agecgan.fid import InceptionFeatures

    return AgeEstimator.from_pretrained(framing=framing), InceptionFeatures.from_package()


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


# ---- age accuracy and realism, then identity -------------------------------------------------


def _fid_and_kid(features_a: np.ndarray, features_b: np.ndarray) -> tuple[float, float, float]:
    from agecgan.fid import fid, kernel_inception_distance

    size = min(KID_SUBSET, len(features_a), len(features_b))
    kid, kid_std = kernel_inception_distance(features_a, features_b, subset_size=size)
    return fid(features_a, features_b), kid, kid_std


def _check_faces(faces: np.ndarray, columns: int) -> None:
    if faces.dtype != np.uint8 or faces.shape[1:] != (columns, 64, 64, 3):
        raise ValueError(
            f"expected (N, {columns}, 64, 64, 3) uint8 faces, got {faces.dtype} {faces.shape}"
        )


def measure_aging(
    aged: np.ndarray,
    reference: RealReference,
    estimator,
    inception,
    *,
    label: str,
    source: str,
    features: np.ndarray | None = None,
    estimated: np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> AgingEvaluation:
    """Age accuracy and realism of faces aged to the six buckets, however they were made.

    aged (N, 6, 64, 64, 3) uint8: aged[i, b] is face i at bucket b. features (N, 6, 2048), the
    faces' FID Inception features, and estimated (6, N), the estimator's buckets, when already
    known. generator: draws which bucket each face gives to the overall FID.
    """
    began = time.perf_counter()
    _check_faces(aged, NUM_BUCKETS)
    generator = generator or torch.Generator().manual_seed(0)
    count = len(aged)
    generated_features, rows = [], []
    for bucket in range(NUM_BUCKETS):
        faces = np.ascontiguousarray(aged[:, bucket])
        guess = estimator.buckets(faces) if estimated is None else estimated[bucket]
        real = reference.buckets == bucket
        real_estimated = reference.estimated[real]
        bucket_features = inception.features(faces) if features is None else features[:, bucket]
        generated_features.append(bucket_features)
        bucket_fid, kid, kid_std = _fid_and_kid(bucket_features, reference.features[real])
        rows.append(
            BucketRow(
                bucket=bucket,
                age_exact=float(np.mean(guess == bucket)),
                age_within_one=float(np.mean(np.abs(guess - bucket) <= 1)),
                mean_age=float(np.mean(estimator.ages(faces))),
                real_exact=float(np.mean(real_estimated == bucket)),
                real_within_one=float(np.mean(np.abs(real_estimated - bucket) <= 1)),
                real_mean_age=float(np.mean(reference.estimated_age[real])),
                real_count=int(real.sum()),
                fid=bucket_fid,
                kid=kid,
                kid_std=kid_std,
            )
        )
    # Overall: each input contributes one aged face, its bucket drawn at random, so the pooled
    # set has the size of one bucket's and an equal share of every age.
    pick = torch.randint(NUM_BUCKETS, (count,), generator=generator).numpy()
    pooled_features = np.stack(generated_features)[pick, np.arange(count)]
    overall_fid, overall_kid, _ = _fid_and_kid(pooled_features, reference.features)
    floor_fid, floor_kid, _ = _fid_and_kid(reference.features[0::2], reference.features[1::2])
    return AgingEvaluation(
        model=label,
        source=source,
        count=count,
        rows=rows,
        fid=overall_fid,
        kid=overall_kid,
        floor_fid=floor_fid,
        floor_kid=floor_kid,
        seconds=time.perf_counter() - began,
    )


def measure_faces(
    inputs: np.ndarray,
    input_buckets: np.ndarray,
    faces: np.ndarray,
    reference: RealReference,
    estimator,
    inception,
    *,
    fr: Judge,
    independent: Judge,
    label: str,
    source: str = "test",
    features: np.ndarray | None = None,
    generator: torch.Generator | None = None,
) -> AgingEvaluation:
    """Every measure of inputs and the faces made of them, however they were made.

    inputs (N, 64, 64, 3) uint8 and their true buckets (N,); faces (N, 7, 64, 64, 3) uint8:
    faces[i, 0] is input i's reconstruction, faces[i, 1 + b] input i aged to bucket b. Age
    accuracy and FID/KID per target bucket (measure_aging), identity of every aged face and of
    the reconstruction by dlib's FR (fr) and by MobileFace (independent), and "both at once".
    features: the aged faces' FID Inception features (N, 6, 2048) when already known.
    """
    began = time.perf_counter()
    _check_faces(faces, 1 + NUM_BUCKETS)
    input_buckets = np.asarray(input_buckets)
    if inputs.shape != (len(faces), 64, 64, 3) or input_buckets.shape != (len(faces),):
        raise ValueError(
            f"expected {len(faces)} inputs and buckets, got {inputs.shape} {input_buckets.shape}"
        )
    aged = faces[:, 1:]
    estimated = np.stack(
        [estimator.buckets(np.ascontiguousarray(aged[:, b])) for b in range(NUM_BUCKETS)]
    )
    evaluation = measure_aging(
        aged,
        reference,
        estimator,
        inception,
        label=label,
        source=source,
        features=features,
        estimated=estimated,
        generator=generator,
    )
    targets = {judge.name: judge.embed(inputs) for judge in (fr, independent)}

    def identity_of(judge: Judge, images: np.ndarray) -> dict:
        return identity_measure(judge, targets[judge.name], judge.embed(images))

    verified = []
    for row in evaluation.rows:
        by_fr = identity_of(fr, aged[:, row.bucket])
        by_independent = identity_of(independent, aged[:, row.bucket])
        row.verified, row.mean_distance = by_fr["verified"], by_fr["mean"]
        row.mobileface_verified = by_independent["verified"]
        row.mobileface_similarity = by_independent["mean"]
        verified.append(independent.same(by_independent["scores"]))
    shares = both_at_once(estimated, np.stack(verified), input_buckets)
    for row, share in zip(evaluation.rows, shares, strict=True):
        row.both = None if np.isnan(share) else float(share)
    by_fr, by_independent = identity_of(fr, faces[:, 0]), identity_of(independent, faces[:, 0])
    evaluation.reconstruction = {
        "verified": by_fr["verified"],
        "mean_distance": by_fr["mean"],
        "distances": [round(float(v), 4) for v in by_fr["scores"]],
        "mobileface_verified": by_independent["verified"],
        "mobileface_similarity": by_independent["mean"],
        "similarities": [round(float(v), 4) for v in by_independent["scores"]],
    }
    evaluation.both_at_once = both_at_once_pooled(estimated, np.stack(verified), input_buckets)
    evaluation.mobileface_threshold = independent.threshold
    evaluation.seconds = time.perf_counter() - began
    return evaluation


# ---- from latents ----------------------------------------------------------------------------


def aged_faces(G, z: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """G(z, y_b) for every z and bucket b -> (N, 6, 64, 64, 3) uint8."""
    out = np.empty((len(z), NUM_BUCKETS, 64, 64, 3), np.uint8)
    with torch.inference_mode():
        for bucket in range(NUM_BUCKETS):
            for start in range(0, len(z), batch_size):
                chunk = z[start : start + batch_size]
                y = one_hot(torch.full((len(chunk),), bucket))
                out[start : start + len(chunk), bucket] = to_uint8(G(chunk, y)).numpy()
    return out


def with_reconstruction(aged: np.ndarray, buckets: np.ndarray) -> np.ndarray:
    """(N, 6, ...) aged faces -> (N, 7, ...): first the face at each input's own bucket."""
    own = aged[np.arange(len(aged)), np.asarray(buckets)]
    return np.concatenate([own[:, None], aged], axis=1)


def evaluate_unchanged(
    reference: RealReference,
    estimator,
    inception,
    *,
    limit: int = 1000,
    fr: Judge | None = None,
    independent: Judge | None = None,
    skip: int = 0,
) -> AgingEvaluation:
    """The baseline that keeps identity and does no aging: every target gets the input itself
    (test faces skip to skip + limit), measured by measure_faces like any model (its FID
    features are the cached real ones)."""
    chosen = slice(skip, skip + limit)
    inputs = reference.images[chosen]
    faces = np.repeat(inputs[:, None], 1 + NUM_BUCKETS, axis=1)
    features = np.repeat(reference.features[chosen, None], NUM_BUCKETS, axis=1)
    return measure_faces(
        inputs,
        reference.buckets[chosen],
        faces,
        reference,
        estimator,
        inception,
        fr=fr or dlib_judge(),
        independent=independent or mobileface_judge(),
        label=UNCHANGED,
        source="unchanged",
        features=features,
    )
