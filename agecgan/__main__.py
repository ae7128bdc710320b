"""Command line: `python -m agecgan prepare ...` (and, later, the aging commands)."""

import argparse
import sys

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

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
