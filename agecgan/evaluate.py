"""Evaluation: `python -m agecgan.evaluate identity --model DIR --data DIR ...`.

identity: how well reconstructions keep the person, as the paper measured it. For real test
faces x and their true ages y, each method gives a reconstruction G(z, y); FR verifies the
pair (x, reconstruction) as the same person when their embeddings are less than 0.6 apart.
Methods: z0 = E(x); pixelwise and identity-preserving latent optimization from z0; and, with
--finetuned, the encoder that `train.py identity` tuned.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from agecgan.ages import one_hot
from agecgan.checkpoints import load_network
from agecgan.face_recognition import SAME_PERSON_THRESHOLD, FaceRecognizer, distance
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, optimize_latent
from agecgan.prepare import FaceDataset, to_model_range

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
    args = parser.parse_args(argv)
    torch.manual_seed(0)
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


if __name__ == "__main__":
    sys.exit(main())
