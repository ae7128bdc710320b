"""Train Age-cGAN: `python train.py gan|encoder|identity ...` (stages 1, 2 and 3), or
`python train.py all ...` (stages 1 and 2, the fp16 export and the evaluation, end to end).

Every option of a stage is a field of its options dataclass in agecgan/training.py, with its
help text. Run under torchrun for several processes, e.g.
`torchrun --nproc-per-node 2 train.py gan --data data/utkface`.
"""

import argparse
import dataclasses
import json
import sys
import typing

from agecgan.runs import RunFolderError
from agecgan.training import (
    AllOptions,
    EncoderOptions,
    GanOptions,
    IdentityOptions,
    train_all,
    train_encoder,
    train_gan,
    train_identity,
)

STAGES = {
    "all": (AllOptions, train_all),
    "gan": (GanOptions, train_gan),
    "encoder": (EncoderOptions, train_encoder),
    "identity": (IdentityOptions, train_identity),
}


def add_options(parser: argparse.ArgumentParser, options_class: type) -> None:
    """One flag per field of the options dataclass, its help text from the field's metadata."""
    for option in dataclasses.fields(options_class):
        default = getattr(options_class(), option.name)
        flag = "--" + option.name.replace("_", "-")
        if isinstance(default, dict):  # the architecture: JSON keys that replace the recipe's
            parser.add_argument(
                flag, type=json.loads, default={}, help=f"{option.metadata['help']}, as JSON"
            )
            continue
        help_text = f"{option.metadata.get('help', '')} (default: {default})"
        choices = typing.get_args(typing.get_type_hints(options_class)[option.name]) or None
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            parser.add_argument(
                flag, type=type(default), default=default, choices=choices, help=help_text
            )


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
    stage = args.pop("stage")
    options_class, train = STAGES[stage]
    dry_run = args.pop("dry_run")
    defaults = options_class()
    for name, value in args.items():  # a partial architecture adds to the recipe's
        if isinstance(getattr(defaults, name), dict):
            args[name] = getattr(defaults, name) | value
    options = options_class(**args)
    if dry_run:
        print(json.dumps(dataclasses.asdict(options), indent=2))
        return 0
    try:
        result = train(options)
    except (RunFolderError, FileNotFoundError) as error:
        print(f"train.py {stage}: {error}", file=sys.stderr)
        return 2
    print(f"finished weights: {result.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
