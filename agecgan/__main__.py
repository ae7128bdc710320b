"""Command line: `python -m agecgan prepare`, `age PHOTO... --out DIR`, `export DIR OUT` and
`evaluate report|compare|identity|calibrate`."""

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from agecgan import evaluate
from agecgan.adapt import DEFAULT_ADAPT_STEPS
from agecgan.pipeline import DEFAULT_RENDER, DEFAULT_STRENGTH, MAX_STRENGTH, RENDERS
from agecgan.sources import format_rejections, scan_source, wiki_rule_table


def _prepare(args: argparse.Namespace) -> int:
    from agecgan.prepare import prepare

    options = {}
    if args.kind in ("wiki", "csv") and args.image_root:
        options["image_root"] = args.image_root
    if args.kind == "wiki":
        options.update(
            min_face_score=args.min_face_score,
            allow_second_face=args.allow_second_face,
            min_age=args.min_age,
            max_age=args.max_age,
            require_file=not args.no_require_file,
        )
        print("wiki.mat cleaning rules (removed in order / removed by the rule alone):")
        for rule, in_order, alone in wiki_rule_table(args.path, **options):
            print(f"  {rule:<40} {in_order:>7,} {alone:>7,}")
    scan = scan_source(args.kind, args.path, **options)
    if args.limit:
        scan.records = scan.records[: args.limit]
        scan.total = len(scan.records) + sum(scan.rejected.values())
    print(format_rejections(scan))
    if not scan.records:
        print("nothing to prepare: no entry passed the label rules", file=sys.stderr)
        return 1
    report = prepare(scan, args.out, source=f"{args.kind}:{args.path}", workers=args.workers)
    print(report.table())
    print(f"wrote {args.out}")
    if args.pack:
        from agecgan.prepare import PACK_NAME, write_pack

        size = write_pack(args.out, Path(args.out) / PACK_NAME)
        print(f"wrote {Path(args.out) / PACK_NAME} ({size / 2**20:.1f} MiB)")
    return 0


def output_names(photos: list[str]) -> list[str]:
    """One file-name stem per input photo, never the same twice: a photo's own stem, or where
    another input has it too (a/photo.jpg, b/photo.jpg), the stem numbered: photo-1, photo-2."""
    stems = [Path(photo).stem for photo in photos]
    counts, seen, names = Counter(stems), Counter(), []
    for stem in stems:
        seen[stem] += 1
        names.append(f"{stem}-{seen[stem]}" if counts[stem] > 1 else stem)
    while len(set(names)) < len(names):  # photo-2 given as a photo's own stem too: renumber
        names = [f"{name}-{index}" for index, name in enumerate(names, 1)]
    return names


def _writable_folder(parser: argparse.ArgumentParser, out: str) -> Path:
    """--out as a folder that exists (made if needed) and takes files; argparse's error else."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        parser.error(f"--out {out} cannot be written to: {error.strerror or error}")
    return folder


def _age(args: argparse.Namespace) -> int:
    from agecgan.ages import BUCKET_LABELS, age_to_bucket
    from agecgan.align import FaceNotFoundError, ImageReadError
    from agecgan.pipeline import AgingPipeline, grid_image, save_gif

    out = _writable_folder(args.parser, args.out)  # before the model loads: fail fast
    try:
        if args.input_age is not None:
            age_to_bucket(args.input_age)  # a bad age fails once, before any work
        pipeline = AgingPipeline.from_pretrained(args.model, device=args.device)
    except (FileNotFoundError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    options = dict(
        input_age=args.input_age,
        optimize_identity=not args.no_identity,
        render=args.render,
        strength=args.strength,
        adapt_steps=args.adapt_steps,
    )
    if args.identity_steps is not None:
        options["identity_steps"] = args.identity_steps
    failed = 0
    for photo, stem in zip(args.photos, output_names(args.photos), strict=True):
        try:
            result = pipeline(photo, output_size=args.size, **options)
        except (ImageReadError, FaceNotFoundError) as error:
            print(f"{photo}: failed: {error}", file=sys.stderr)
            failed += 1
            continue
        grid_image(result).save(out / f"{stem}_grid.png")
        for label, face, pasted in zip(BUCKET_LABELS, result.aged, result.pasted, strict=True):
            face.save(out / f"{stem}_age_{label}.png")
            pasted.save(out / f"{stem}_pasted_{label}.jpg", quality=95)
        save_gif(pipeline.progression(result, frames=args.frames), out / f"{stem}_progression.gif")
        renamed = "" if stem == Path(photo).stem else " (numbered: another photo has its name)"
        notes = "".join(f"; {note}" for note in result.notes)
        print(f"{photo}: wrote {out / stem}_*{renamed}{notes}")
    return 1 if failed else 0


def _whole_number(least: int):
    """argparse type: a whole number of at least `least`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, not {value}")
        return value

    return parse


_positive, _count = _whole_number(1), _whole_number(0)


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= MAX_STRENGTH:
        raise argparse.ArgumentTypeError(f"must be from 0 to {MAX_STRENGTH:g}, not {text}")
    return value


def _export(args: argparse.Namespace) -> int:
    import torch

    from agecgan.checkpoints import NETWORK_FILES, export_model, load_config, load_network

    source = Path(args.model)
    try:
        config = load_config(source)
        names = [name for name, file in NETWORK_FILES.items() if (source / file).is_file()]
        networks = {name: load_network(source, name) for name in names}
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"{source}: {error}", file=sys.stderr)
        return 1
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[args.dtype]
    export_model(args.out, config, dtype, **networks)
    for name in names:
        size = (Path(args.out) / NETWORK_FILES[name]).stat().st_size / 2**20
        print(f"{Path(args.out) / NETWORK_FILES[name]}: {size:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agecgan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prep = commands.add_parser("prepare", help="detect, align and cache a labelled face source")
    prep.add_argument("kind", choices=["utkface", "wiki", "csv"], help="layout of the source")
    prep.add_argument("path", help="UTKFace folder, wiki.mat file, or CSV file of path,age")
    prep.add_argument("--out", required=True, help="folder for faces.npz and the report")
    prep.add_argument(
        "--image-root",
        help="where image paths start (wiki, csv); default: the folder of the .mat or .csv file",
    )
    prep.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    prep.add_argument("--limit", type=int, default=0, help="only the first N labelled images")
    prep.add_argument(
        "--pack",
        action="store_true",
        help="also write faces-pack.npz: the faces as JPEG, a fifth of the size, for moving "
        "the data with the code (training reads either)",
    )
    wiki = prep.add_argument_group("wiki cleaning options")
    wiki.add_argument("--min-face-score", type=float, default=1.0)
    wiki.add_argument("--allow-second-face", action="store_true")
    wiki.add_argument("--min-age", type=int, default=1)
    wiki.add_argument("--max-age", type=int, default=100)
    wiki.add_argument(
        "--no-require-file",
        action="store_true",
        help="keep entries whose image is missing (label statistics only)",
    )
    prep.set_defaults(run=_prepare)

    age = commands.add_parser(
        "age",
        help="age the largest face of each photo",
        description="Writes per photo: <stem>_grid.png (input, reconstruction, then the six "
        "ages, youngest first, labelled), <stem>_age_<bucket>.png, <stem>_pasted_<bucket>.jpg "
        "(the aged face in the photo) and <stem>_progression.gif. Photos with the same stem "
        "(a/photo.jpg, b/photo.jpg) get numbered stems (photo-1, photo-2), so that none "
        "replaces another. Exit code 1 if any failed, 2 on bad options.",
    )
    age.add_argument("photos", nargs="+", metavar="PHOTO")
    age.add_argument("--out", required=True, help="folder for the results")
    age.add_argument("--model", help="model folder (default: the shipped checkpoints/)")
    age.add_argument(
        "--input-age",
        type=int,
        help="age of the person in the photos, in years (default: estimated per photo)",
    )
    age.add_argument(
        "--render",
        choices=RENDERS,
        default=DEFAULT_RENDER,
        help="generated: G draws the face; detail: the photo's face plus G's age change",
    )
    age.add_argument(
        "--strength",
        type=_strength,
        default=DEFAULT_STRENGTH,
        help=f"scale of the age change, 0 to {MAX_STRENGTH:g} (1: G's own)",
    )
    age.add_argument(
        "--adapt-steps",
        type=_count,
        default=DEFAULT_ADAPT_STEPS,
        help="steps of tuning a copy of G to each photo first (0: off)",
    )
    identity = age.add_mutually_exclusive_group()
    identity.add_argument(
        "--identity-steps",
        type=_count,
        help="steps of identity-preserving latent optimization (default: the pipeline's, 20)",
    )
    identity.add_argument("--no-identity", action="store_true", help="use z = E(x) as it is")
    age.add_argument(
        "--size", type=_positive, default=256, help="side of the faces (Lanczos from 64)"
    )
    age.add_argument(
        "--frames", type=_positive, default=30, help="GIF frames from youngest to oldest"
    )
    age.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda...")
    age.set_defaults(run=_age, parser=age)

    export = commands.add_parser(
        "export",
        help="copy a model folder's networks in another precision (fp16: what checkpoints/ ships)",
        description="Loads each network strictly and writes it with config.json; networks "
        "stored in fp16 load back as fp32.",
    )
    export.add_argument("model", help="model folder (config.json + *.safetensors)")
    export.add_argument("out", help="folder to write (existing network files are replaced)")
    export.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    export.set_defaults(run=_export)

    measure = commands.add_parser(
        "evaluate",
        help="measure a model: report, compare, identity, calibrate",
        description=evaluate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_commands(measure)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
