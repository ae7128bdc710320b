"""The evaluation report: markdown tables, the grids of aged faces, the age plot and
write_report, which writes them all into one folder from one Report."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from agecgan import mobileface
from agecgan.ages import BUCKET_LABELS
from agecgan.face_recognition import SAME_PERSON_THRESHOLD
from agecgan.measures import AgedFaces, AgingEvaluation, IdentityRow

REPORT_NAME = "evaluation.md"

# The paper's verification rates (OpenFace, on its own test set), for the README's comparison.
PAPER_RATES = {"z0": 0.532, "pixelwise": 0.598, "identity": 0.829}


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


# ---- aging -----------------------------------------------------------------------------------


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


def modes_table(rows) -> str:
    """Markdown: one row per mode (evaluation, age_order's extras, seconds per face or None),
    then age and FID per target bucket, then identity per target bucket."""
    threshold = next((e.mobileface_threshold for e, *_ in rows if e.mobileface_threshold), "")
    head = (
        "| drawn by | in target bucket | within one | span, years | six in order | "
        f"dlib verified: reconstruction / aged | MobileFace (at {threshold}) verified: "
        "reconstruction / aged | **both at once** | FID | s/face |"
    )
    lines = [head, _separator(head)]
    for e, extra, seconds, *_ in rows:
        recon, bucket_rows = e.reconstruction, e.rows
        lines.append(
            f"| {e.model} | {np.mean([r.age_exact for r in bucket_rows]):.1%} | "
            f"{np.mean([r.age_within_one for r in bucket_rows]):.1%} | {extra['span']:.1f} | "
            f"{extra['in_order']:.1%} | {_percent(recon.get('verified'))} / "
            f"{_percent(_mean([r.verified for r in bucket_rows]))} | "
            f"{_percent(recon.get('mobileface_verified'))} / "
            f"{_percent(_mean([r.mobileface_verified for r in bucket_rows]))} | "
            f"**{_percent(e.both_at_once)}** | {e.fid:.1f} | "
            + ("-" if seconds is None else f"{seconds:.2f}")
            + " |"
        )
    head = (
        "| drawn by | "
        + " | ".join(f"{label}: age / mean est. / FID" for label in BUCKET_LABELS)
        + " |"
    )
    lines += ["", head, _separator(head)]
    for e, extra, *_ in rows:
        cells = [
            f"{r.age_exact:.0%} / {age:.0f} / {r.fid:.0f}"
            for r, age in zip(e.rows, extra["mean_ages"], strict=True)
        ]
        lines.append(f"| {e.model} | " + " | ".join(cells) + " |")
    real = rows[0][0].rows
    lines.append(
        "| real test faces | "
        + " | ".join(f"{r.real_exact:.0%} / {r.real_mean_age:.0f} / -" for r in real)
        + " |"
    )
    head = (
        "| drawn by | "
        + " | ".join(
            f"{label}: MobileFace verified / cosine / dlib verified" for label in BUCKET_LABELS
        )
        + " |"
    )
    lines += ["", head, _separator(head)]
    for e, *_ in rows:
        cells = [
            f"{_percent(r.mobileface_verified)} / {_score(r.mobileface_similarity)} / "
            f"{_percent(r.verified)}"
            for r in e.rows
        ]
        lines.append(f"| {e.model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mode_grid(inputs: np.ndarray, modes: list[tuple[str, np.ndarray]]) -> Image.Image:
    """For each input, one labelled row per mode: the input, the reconstruction, six ages."""
    size, band, label_width = 64, 14, 200
    rows = [(name, i) for i in range(len(inputs)) for name, _ in modes]
    grid = Image.new("RGB", (label_width + size * 8, band + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    for column, label in enumerate(["input", "reconstruction", *BUCKET_LABELS]):
        x = label_width + column * size + size / 2
        draw.text((x, band / 2), label, fill="black", font=font, anchor="mm")
    faces = dict(modes)
    for place, (name, i) in enumerate(rows):
        y = band + place * size
        draw.text((4, y + size / 2), name, fill="black", font=font, anchor="lm")
        for column, tile in enumerate([inputs[i], *faces[name][i]]):
            grid.paste(Image.fromarray(tile), (label_width + column * size, y))
    return grid


def photo_grid(rows: list[tuple[str, list[Image.Image]]], height: int = 160) -> Image.Image:
    """Labelled rows of photos, each scaled to one height: the input photo, then its six pasted
    ages (the app's examples in every mode)."""
    band, label_width = 14, 240

    def scale(photo: Image.Image) -> Image.Image:
        return photo.resize((round(photo.width * height / photo.height), height))

    scaled = [(name, [scale(photo) for photo in row]) for name, row in rows]
    width = label_width + max(sum(photo.width for photo in row) for _, row in scaled)
    grid = Image.new("RGB", (width, band + height * len(scaled)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=10)
    draw.text(
        (label_width, band / 2),
        "photo, then " + ", ".join(BUCKET_LABELS),
        fill="black",
        font=font,
        anchor="lm",
    )
    for place, (name, row) in enumerate(scaled):
        y = band + place * height
        draw.text((4, y + height / 2), name, fill="black", font=font, anchor="lm")
        x = label_width
        for photo in row:
            grid.paste(photo.convert("RGB"), (x, y))
            x += photo.width
    return grid


def _separator(head: str) -> str:
    columns = head.count("|") - 1
    return "|---" + "|---:" * (columns - 1) + "|"


def aging_grid(inputs: np.ndarray, faces: np.ndarray, rows=8):
    """Input faces (rows: a count, or which faces): the input, then its faces (N, 7, 64, 64, 3),
    the reconstruction and the six ages."""
    chosen = list(range(min(rows, len(inputs)))) if isinstance(rows, int) else list(rows)
    labels = ["input", "reconstruction", *BUCKET_LABELS]
    size, band = 64, 14
    grid = Image.new("RGB", (size * len(labels), band + size * len(chosen)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=9)
    for column, label in enumerate(labels):
        draw.text((column * size + size / 2, band / 2), label, fill="black", font=font, anchor="mm")
    for place, row in enumerate(chosen):
        for column, tile in enumerate([inputs[row], *faces[row]]):
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


@dataclass
class Report:
    """What write_report needs: the model's faces aged from z = E(x), measured, and what to set
    beside them."""

    aged: AgedFaces  # z = E(x), no optimization: the main tables, grid.png and ages.png
    ages: np.ndarray | None = None  # the inputs' true ages (the first count): failures.png
    optimized: AgedFaces | None = None  # after identity optimization: grid_optimized.png
    baseline: AgingEvaluation | None = None  # the photo returned unchanged
    identity_rows: list[IdentityRow] | None = None  # the identity table of reconstructions
    identity_steps: int = 0  # the steps of that table's optimizations


def write_report(out: Path, report: Report) -> Path:
    """evaluation.md, evaluation.json, grid.png, ages.png and (with the true ages)
    failures.png in `out`; with `optimized`, its table and grid_optimized.png too; with
    `baseline`, its table, and a first table of every way of aging side by side."""
    evaluation, inputs, faces = report.aged.evaluation, report.aged.inputs, report.aged.faces
    optimized, baseline = report.optimized, report.baseline
    out.mkdir(parents=True, exist_ok=True)
    aging_grid(inputs, faces).save(out / "grid.png")
    if report.ages is not None and evaluation.reconstruction:
        hard = hard_cases(evaluation, report.ages)
        aging_grid(inputs, faces, hard).save(out / "failures.png")
    aging_plot(evaluation, out / "ages.png")
    parts = [
        f"# Evaluation of {evaluation.model}",
        "",
        f"UTKFace test split, {evaluation.count} faces per target bucket "
        f"(z = E(x) of the first {evaluation.count} test faces, no latent optimization); "
        f"{evaluation.seconds:.0f} s on the CPU. Written by `python -m agecgan evaluate report`.",
    ]
    compared = (
        [evaluation]
        + ([optimized.evaluation] if optimized else [])
        + ([baseline] if baseline else [])
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
        again = optimized.evaluation
        aging_grid(optimized.inputs, optimized.faces).save(out / "grid_optimized.png")
        parts += [
            "",
            f"## Aging after identity-preserving optimization ({again.identity_steps} steps), "
            "the paper's stage 3, in G's own drawing",
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
    if report.identity_rows:
        parts += [
            "",
            f"## Identity of reconstructions ({report.identity_rows[0].count} test faces)",
            "",
            identity_table(report.identity_rows, report.identity_steps),
        ]
    path = out / REPORT_NAME
    path.write_text("\n".join(parts) + "\n")
    record = asdict(evaluation) | {
        "identity": [asdict(row) for row in report.identity_rows or []],
        "optimized": asdict(optimized.evaluation) if optimized else None,
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
