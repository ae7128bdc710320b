"""Train Age-cGAN: `python train.py gan|encoder|identity ...` (stages 1, 2 and 3).

Every option of a stage is a field of its options dataclass in agecgan/training.py, whose
comment is the help text here. Run under torchrun for several processes, e.g.
`torchrun --nproc-per-node 2 train.py gan --data data/utkface`.
"""

import argparse
import dataclasses
import inspect
import json
import re
import sys

from agecgan.training import (
    EncoderOptions,
    GanOptions,
    IdentityOptions,
    train_encoder,
    train_gan,
    train_identity,
)

STAGES = {
    "gan": (GanOptions, train_gan),
    "encoder": (EncoderOptions, train_encoder),
    "identity": (IdentityOptions, train_identity),
}


def field_comments(options_class: type) -> dict[str, str]:
    """The trailing comment of each `name: type = default  # comment` line, by field name."""
    comments = {}
    for cls in reversed(options_class.__mro__[:-1]):
        for match in re.finditer(
            r"^\s+(\w+): [^=\n]+=[^#\n]+#\s*(.+)$", inspect.getsource(cls), re.MULTILINE
        ):
            comments[match.group(1)] = match.group(2)
    return comments


def add_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    comments = field_comments(options_class)
    for option in dataclasses.fields(options_class):
        default = options_class().__getattribute__(option.name)
        if isinstance(default, dict):
            continue  # the architecture config: fixed to the recipe's from the command line
        flag = "--" + option.name.replace("_", "-")
        help_text = f"{comments.get(option.name, '')} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=help_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = parser.add_subparsers(dest="stage", required=True)
    for name, (options_class, _) in STAGES.items():
        stage = stages.add_parser(name, help=options_class.__doc__)
        add_options(stage, options_class)
        stage.add_argument(
            "--dry-run", action="store_true", help="print the resolved options and exit"
        )
    args = vars(parser.parse_args(argv))
    options_class, train = STAGES[args.pop("stage")]
    dry_run = args.pop("dry_run")
    options = options_class(**args)
    if options.precision not in ("fp32", "bf16"):
        parser.error(f"--precision must be fp32 or bf16, not {options.precision}")
    if dry_run:
        print(json.dumps(dataclasses.asdict(options), indent=2))
        return 0
    result = train(options)
    print(f"finished weights: {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
