"""Evaluation on the UTKFace test split (never trained on), with networks independent of G.

    python -m agecgan evaluate report --model checkpoints --out checkpoints/evaluation
    python -m agecgan evaluate compare runs/gan/snapshots/step-*   # stage-1 weights, G only
    python -m agecgan evaluate identity --model DIR [--finetuned DIR]
    python -m agecgan evaluate calibrate --out docs/identity_networks.md  # identity thresholds
    python -m agecgan evaluate modes --model DIR --out docs/modes  # the pipeline's drawings

report: the full report (markdown, a grid and a plot). For every test face x, z = E(x) and
the six aged faces G(z, y_b). Age: an independent age estimator (Cydral's, shipped in checkpoints/)
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

modes: the pipeline's ways of drawing the aged faces (render, strength, identity steps,
adaptation steps), each on the same test faces at their true ages, through the pipeline's own
faces_from and compose, measured like the report (both networks, both at once, FID per target
bucket) plus the age span, the share of inputs whose six ages come out in order, and seconds per
face; the unchanged photo frames them.

`python -m agecgan.evaluate` is an alias of `python -m agecgan evaluate`. This file is the
command line and decides which faces and latents are measured; the measures are in
agecgan/measures.py, the report in agecgan/report.py, the calibration in agecgan/calibrate.py.
"""

import argparse
import functools
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from agecgan import mobileface
from agecgan.ages import one_hot
from agecgan.align import Framing
from agecgan.calibrate import calibrate, calibration_markdown
from agecgan.checkpoints import atomic_write, load_config, load_network
from agecgan.face_recognition import SAME_PERSON_THRESHOLD, FaceRecognizer, distance
from agecgan.identity import DEFAULT_LR, DEFAULT_STEPS, OBJECTIVES, optimize_latent
from agecgan.measures import (
    AgedFaces,
    AgingEvaluation,
    IdentityRow,
    Judge,
    RealReference,
    aged_faces,
    dlib_judge,
    evaluate_unchanged,
    load_measures,
    measure_aging,
    measure_faces,
    mobileface_judge,
    real_reference,
    with_reconstruction,
)
from agecgan.mobileface import MobileFaceRecognizer
from agecgan.networks import to_model_range, to_uint8
from agecgan.pipeline import (
    DEFAULT_RENDER,
    IDENTITY_OBJECTIVE,
    RENDERS,
    AgingPipeline,
    check_render,
    compose,
)
from agecgan.prepare import FaceDataset
from agecgan.report import (
    Report,
    compare_table,
    identity_table,
    mode_grid,
    modes_table,
    photo_grid,
    write_report,
)
from agecgan.service import EXAMPLES, EXAMPLES_FOLDER


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


# ---- where the latents come from -------------------------------------------------------------


def encode(E, faces: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """z = E(x) of (N, 64, 64, 3) uint8 faces -> (N, z_dim)."""
    x = to_model_range(torch.from_numpy(faces))
    with torch.inference_mode():
        return torch.cat([E(chunk) for chunk in x.split(batch_size)])


def optimize_for_identity(
    G, FR, faces: np.ndarray, buckets: np.ndarray, z: torch.Tensor, steps: int
) -> torch.Tensor:
    """z refined by `steps` of identity-preserving optimization at the true ages, as the app
    does, 50 faces at a time."""
    x = to_model_range(torch.from_numpy(faces))
    y = one_hot(torch.from_numpy(buckets))
    return torch.cat(
        [
            optimize_latent(G, xb, yb, z0=zb.clone(), FR=FR, steps=steps, lr=DEFAULT_LR).z.detach()
            for xb, yb, zb in zip(x.split(50), y.split(50), z.split(50), strict=True)
        ]
    )


def evaluate_model(
    model: str | Path,
    reference: RealReference,
    estimator,
    inception,
    *,
    limit: int = 1000,
    identity_steps: int = 0,
    fr: Judge | None = None,
    independent: Judge | None = None,
) -> AgedFaces:
    """A model folder's E and G on the first `limit` test faces: z = E(x) (identity_steps > 0:
    then optimized for identity at the true age, as the app does), aged to every bucket and
    measured."""
    began = time.perf_counter()
    independent = independent or mobileface_judge()  # first: fail before the work
    fr = fr or dlib_judge()
    G, E = load_network(model, "generator"), load_network(model, "encoder")
    inputs, buckets = reference.images[:limit], reference.buckets[:limit]
    z = encode(E, inputs)
    if identity_steps:
        z = optimize_for_identity(G, fr.network, inputs, buckets, z, identity_steps)
    faces = with_reconstruction(aged_faces(G, z), buckets)  # G(z, true y) first
    evaluation = measure_faces(
        inputs,
        buckets,
        faces,
        reference,
        estimator,
        inception,
        fr=fr,
        independent=independent,
        label=str(model),
    )
    evaluation.seconds = time.perf_counter() - began
    evaluation.identity_steps = identity_steps
    return AgedFaces(evaluation, inputs, faces)


def evaluate_generator(
    model: str | Path,
    reference: RealReference,
    estimator,
    inception,
    *,
    limit: int = 500,
    seed: int = 0,
) -> AgingEvaluation:
    """A model folder's G alone, from `limit` random z per bucket: age accuracy and realism."""
    began = time.perf_counter()
    G = load_network(model, "generator")
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(limit, G.config.z_dim, generator=generator)
    evaluation = measure_aging(
        aged_faces(G, z),
        reference,
        estimator,
        inception,
        label=str(model),
        source="random",
        generator=generator,
    )
    evaluation.seconds = time.perf_counter() - began
    return evaluation


# ---- identity of reconstructions, by method --------------------------------------------------


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


# ---- the command line ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way the pipeline draws aged faces: AgingPipeline.__call__'s options."""

    render: str = DEFAULT_RENDER
    strength: float = 1.0
    identity_steps: int = DEFAULT_STEPS
    adapt_steps: int = 0
    objective: str = IDENTITY_OBJECTIVE

    @property
    def name(self) -> str:
        adapt = f", adapt {self.adapt_steps}" if self.adapt_steps else ""
        # Named even where it is the default: a table stays readable after the default changes.
        objective = f" ({self.objective})" if self.identity_steps else ""
        return f"{self.render} x{self.strength:g}, identity {self.identity_steps}{objective}{adapt}"

    @property
    def text(self) -> str:
        """The mode as `parse` reads it."""
        steps = f"{self.identity_steps}:{self.adapt_steps}"
        objective = "" if self.objective == IDENTITY_OBJECTIVE else f":{self.objective}"
        return f"{self.render}:{self.strength:g}:{steps}{objective}"

    @property
    def fitting(self) -> tuple[int, int, str]:
        """What faces_from computes for this mode: modes that share it share its run."""
        return self.identity_steps, self.adapt_steps, self.objective

    @classmethod
    def parse(cls, text: str) -> "Mode":
        """'render:strength:identity_steps:adapt_steps[:objective]', e.g. 'detail:2:20:0'."""
        try:
            render, strength, identity, adapt, *objective = text.split(":")
            if len(objective) > 1 or objective and objective[0] not in OBJECTIVES:
                raise ValueError(f"the objective is one of {', '.join(OBJECTIVES)}")
            mode = cls(render, float(strength), int(identity), int(adapt), *objective)
            check_render(mode.render, mode.strength, mode.adapt_steps)
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not render:strength:identity_steps:adapt_steps[:objective] "
                f"(render one of {', '.join(RENDERS)}): {error}"
            ) from None
        return mode


# The table of the README and the model card: G's own faces (the default when issue 9 was
# filed), detail drawing at strength 1 and 2, the pixel-and-FR objective, adaptation (30 steps,
# and 20 for the time budget) and the combination of all three, with the age change at 1.25 and
# 1.5: the shipped G's change is small, and 1.25 with 20 adaptation steps won "both at once".
MODES = (
    Mode("generated", objective="identity"),
    Mode("detail", 1.0, objective="identity"),
    Mode("detail", 2.0, objective="identity"),
    Mode("detail", 1.0, objective="both"),
    Mode("generated", adapt_steps=30, objective="both"),
    Mode("detail", 1.0, adapt_steps=20, objective="both"),
    Mode("detail", 1.0, adapt_steps=30, objective="both"),
    Mode("detail", 1.25, adapt_steps=20, objective="both"),
    Mode("detail", 1.5, adapt_steps=20, objective="both"),
)


def render_modes(
    pipeline: AgingPipeline,
    inputs: np.ndarray,
    buckets: np.ndarray,
    modes,
    saved: Path | None = None,
) -> dict[Mode, tuple[np.ndarray, list[float]]]:
    """Each mode's faces (N, 7, 64, 64, 3) of aligned test faces at their true buckets, through
    the pipeline's own faces_from and compose, and the seconds each face took. Modes that share
    their optimization (identity and adaptation steps) share its run. With `saved` (a folder),
    the runs are saved as they go and a killed command resumes where it stopped."""
    made: dict[Mode, tuple[np.ndarray, list[float]]] = {}
    for fitting in dict.fromkeys(m.fitting for m in modes):
        same = [m for m in modes if m.fitting == fitting]
        identity_steps, adapt_steps, objective = fitting
        file = saved / f"fitting-{identity_steps}-{adapt_steps}-{objective}.npz" if saved else None
        generated, fitted = fit_faces(pipeline, inputs, buckets, fitting, same[0].name, file)
        for mode in same:
            faces = np.empty((len(inputs), 7, 64, 64, 3), np.uint8)
            seconds = []
            for i, face in enumerate(inputs):
                began = time.perf_counter()
                faces[i] = compose(generated[i], face, mode.render, mode.strength)[0]
                seconds.append(float(fitted[i]) + time.perf_counter() - began)
            made[mode] = faces, seconds
    return made


def fit_faces(
    pipeline: AgingPipeline,
    inputs: np.ndarray,
    buckets: np.ndarray,
    fitting: tuple[int, int, str],
    name: str,
    file: Path | None,
) -> tuple[np.ndarray, np.ndarray]:
    """faces_from on every input: G's seven faces (N, 7, 64, 64, 3) float32 and the seconds
    each took. faces_from is deterministic (adaptation draws from its own seed), so a run
    resumed from `file` (saved every 25 faces, atomically) gives the faces an unbroken one would."""
    generated = np.empty((len(inputs), 7, 64, 64, 3), np.float32)
    seconds = np.empty(len(inputs))
    # What the saved faces depend on: the weights, the inputs and their buckets, the fitting.
    key = hashlib.sha256(repr(fitting).encode())
    for tensor in [
        *pipeline.encoder.state_dict().values(),
        *pipeline.generator.state_dict().values(),
    ]:
        key.update(tensor.detach().cpu().float().numpy().tobytes())
    key.update(inputs.tobytes())
    key.update(np.asarray(buckets, np.int64).tobytes())
    done = 0
    if file is not None and file.exists():
        with np.load(file) as old:
            if str(old["key"]) == key.hexdigest():
                done = int(old["done"])
                generated[:done] = old["generated"][:done]
                seconds[:done] = old["seconds"][:done]
                print(f"  {name}: resumed after {done} faces", file=sys.stderr)
    identity_steps, adapt_steps, objective = fitting
    for i in range(done, len(inputs)):
        began = time.perf_counter()
        _, _, generated[i] = pipeline.faces_from(
            inputs[i], int(buckets[i]), False, identity_steps, adapt_steps, objective=objective
        )
        seconds[i] = time.perf_counter() - began
        if file is not None and ((i + 1) % 25 == 0 or i + 1 == len(inputs)):
            with atomic_write(file) as tmp:
                np.savez(
                    tmp,
                    key=key.hexdigest(),
                    done=i + 1,
                    generated=generated[: i + 1],
                    seconds=seconds[: i + 1],
                )
        if (i + 1) % 50 == 0:
            print(f"  {name}: {i + 1} faces", file=sys.stderr)
    return generated, seconds


def age_order(estimator, faces: np.ndarray) -> dict:
    """From the estimated ages of the six aged faces of each input: the span (60+ minus 0-18,
    in years) and the share of inputs whose six ages rise bucket by bucket."""
    ages = np.stack([estimator.ages(np.ascontiguousarray(faces[:, 1 + b])) for b in range(6)], 1)
    return {
        "span": float(np.mean(ages[:, -1] - ages[:, 0])),
        "in_order": float(np.mean(np.all(np.diff(ages, axis=1) > 0, axis=1))),
        "mean_ages": [float(a) for a in ages.mean(0)],
    }


def evaluate_modes(args: argparse.Namespace) -> int:
    mobileface.require_installed()
    framing = framing_of(args.model, args.data)
    estimator, inception, reference = _measures(framing, args.data)
    judges = dict(fr=dlib_judge(framing=framing), independent=mobileface_judge(framing=framing))
    measured = dict(reference=reference, estimator=estimator, inception=inception)
    pipeline = AgingPipeline.from_pretrained(args.model, device="cpu")
    start, stop = args.skip, args.skip + args.limit
    inputs, buckets = reference.images[start:stop], reference.buckets[start:stop]
    out = Path(args.out)
    saved = out / "in-progress"  # the fittings so far: a killed command resumes from them
    saved.mkdir(parents=True, exist_ok=True)
    rows = []
    unchanged = evaluate_unchanged(**measured, limit=args.limit, skip=start, **judges)
    faces = np.repeat(inputs[:, None], 7, axis=1)
    rows.append((unchanged, age_order(estimator, faces), None, faces))
    for mode, (faces, seconds) in render_modes(
        pipeline, inputs, buckets, args.modes, saved
    ).items():
        evaluation = measure_faces(
            inputs, buckets, faces, **measured, **judges, label=mode.name, source="test"
        )
        rows.append((evaluation, age_order(estimator, faces), float(np.median(seconds)), faces))
        print(modes_table(rows[-1:]), file=sys.stderr)
    command = "python -m agecgan evaluate modes " + " ".join(sys.argv[3:])
    text = (
        f"Written by `{command}`: {len(inputs)} UTKFace test faces (from face {start}) x 6 "
        f"targets, model {args.model}. Seconds per face: E, identity steps, adaptation and G "
        "on this machine's CPU (no detection or paste-back), median.\n\n" + modes_table(rows)
    )
    (out / "modes.md").write_text(text + "\n")
    records = [
        {"mode": e.model, **extra, "seconds": sec, "evaluation": asdict(e)}
        for e, extra, sec, _ in rows
    ]
    (out / "modes.json").write_text(json.dumps(records, indent=1, default=float))
    mode_grid(inputs[:10], [(e.model, faces[:10]) for e, _, _, faces in rows]).save(
        out / "modes.png"
    )
    examples_in_modes(pipeline, args.modes).save(out / "examples.jpg", quality=90)
    shutil.rmtree(saved)  # the table is written: the faces behind it are not kept (~170 MB each)
    print(text)
    return 0


def examples_in_modes(pipeline: AgingPipeline, modes) -> Image.Image:
    """The app's example photos aged in every mode, pasted back as the app shows them and cut
    around the face (their ages as the app's examples give them, else estimated)."""
    rows = []
    for name, (file, age) in EXAMPLES.items():
        for mode in modes:
            result = pipeline(
                EXAMPLES_FOLDER / file,  # read by the pipeline's own reader, as the app does
                input_age=age,
                optimize_identity=mode.identity_steps > 0,
                identity_steps=mode.identity_steps,
                render=mode.render,
                strength=mode.strength,
                adapt_steps=mode.adapt_steps,
                faces_from=functools.partial(pipeline.faces_from, objective=mode.objective),
            )
            x1, y1, x2, y2 = result.box  # the face and its surroundings: what aging changes
            side, cx, cy = 1.6 * max(x2 - x1, y2 - y1), (x1 + x2) / 2, (y1 + y2) / 2
            crop = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
            row = [result.photo, *result.pasted]
            rows.append((f"{name}: {mode.name}", [image.crop(crop) for image in row]))
    return photo_grid(rows)


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The subcommands report, compare, identity and calibrate on `parser`: that of
    `python -m agecgan evaluate` and of its alias `python -m agecgan.evaluate`."""
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
    modes = kinds.add_parser("modes", help="the pipeline's ways of drawing, side by side")
    modes.add_argument("--model", default="checkpoints", help="model folder (E and G)")
    modes.add_argument("--data", default="data/utkface", help="prepared dataset (test split)")
    modes.add_argument("--out", required=True, help="folder for modes.md, .json and .png")
    modes.add_argument("--limit", type=int, default=500, help="test faces to age")
    modes.add_argument("--skip", type=int, default=0, help="start at this test face")
    modes.add_argument(
        "--modes",
        nargs="+",
        type=Mode.parse,
        default=list(MODES),
        help="render:strength:identity_steps:adapt_steps[:objective] each (default: "
        + " ".join(mode.text for mode in MODES)
        + ")",
    )
    modes.set_defaults(handler=evaluate_modes)
    identity.set_defaults(handler=_identity)
    report.set_defaults(handler=_report)
    compare.set_defaults(handler=_compare)
    calibration.set_defaults(handler=_calibrate)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: torch seeded, a missing MobileFace said in one line."""
    torch.manual_seed(0)
    try:
        return args.handler(args)
    except mobileface.MobileFaceMissingError as error:  # a set-up step, not a bug: no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m agecgan.evaluate`: an alias of `python -m agecgan evaluate`."""
    parser = argparse.ArgumentParser(
        prog="python -m agecgan.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_commands(parser)
    args = parser.parse_args(argv)
    return args.run(args)


def _calibrate(args: argparse.Namespace) -> int:
    result = calibrate(args.data, args.photos, limit=args.limit, seed=args.seed)
    command = "python -m agecgan evaluate calibrate"
    command += f" --limit {args.limit}" if args.limit else ""
    command += f" --out {args.out}" if args.out else ""
    text = calibration_markdown(result, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _identity(args: argparse.Namespace) -> int:
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


def _measures(framing: Framing, data: str):
    """The age estimator and FID network for faces cut with `framing`, and their measures of
    the real test faces."""
    estimator, inception = load_measures(framing)
    began = time.perf_counter()
    reference = real_reference(data, estimator, inception)
    print(f"real test faces: {len(reference.images)} in {time.perf_counter() - began:.0f} s")
    return estimator, inception, reference


def _compare(args: argparse.Namespace) -> int:
    framing = {framing_of(model, args.data) for model in args.models}.pop()  # one, or an error
    estimator, inception, reference = _measures(framing, args.data)
    evaluations = []
    for model in args.models:
        evaluation = evaluate_generator(model, reference, estimator, inception, limit=args.limit)
        evaluations.append(evaluation)
        print(f"{model}: {evaluation.seconds:.0f} s", file=sys.stderr)
    table = compare_table(evaluations)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    mobileface.require_installed()  # MobileFace judges every test source: a missing one stops now
    framing = framing_of(args.model, args.data)
    independent = mobileface_judge(framing=framing)
    estimator, inception, reference = _measures(framing, args.data)
    fr = dlib_judge(framing=framing)  # one FR for every pass
    judges = dict(fr=fr, independent=independent)
    measured = dict(reference=reference, estimator=estimator, inception=inception)
    report = Report(
        aged=evaluate_model(args.model, **measured, limit=args.limit, **judges),
        ages=reference.ages,
        identity_steps=args.steps,
    )
    if args.aging_steps:
        report.optimized = evaluate_model(
            args.model, **measured, limit=args.limit, identity_steps=args.aging_steps, **judges
        )
    report.baseline = evaluate_unchanged(**measured, limit=args.limit, **judges)
    if args.identity_limit:
        report.identity_rows = evaluate_identity(
            args.model,
            args.data,
            limit=args.identity_limit,
            steps=args.steps,
            mobileface_recognizer=independent.network,
        )
    out = Path(args.out) if args.out else Path(args.model) / "evaluation"
    print(write_report(out, report).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
