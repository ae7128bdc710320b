"""Saving and loading: atomic training states, finished weights as safetensors + config.json,
and where the files the project ships (checkpoints/, app/examples/) are found.

Nothing here unpickles code: training states load with torch.load(weights_only=True) and
finished networks are plain safetensors, loaded strictly.
"""

import contextlib
import functools
import importlib.metadata
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from agecgan.networks import AgeCGANConfig, Discriminator, Encoder, Generator

CONFIG_NAME = "config.json"
NETWORK_FILES = {
    "encoder": "encoder.safetensors",
    "generator": "generator.safetensors",
    "discriminator": "discriminator.safetensors",
}
NETWORK_CLASSES = {"encoder": Encoder, "generator": Generator, "discriminator": Discriminator}
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # in a checkout, the repository itself
# `pip install .` copies the shipped files under the install's prefix, laid out as in the
# repository (pyproject.toml's data-files): <prefix>/share/agecgan/checkpoints/config.json.
INSTALLED_FOLDER = "share/agecgan"


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write to the yielded temporary path beside `path` (its suffix kept: numpy and PIL go by
    it); on success it is synced to disk and renamed over `path`. A process killed at any moment
    leaves the old file or none, never half a file; the project's every save goes through here."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_training_state(path: str | Path, state: dict) -> None:
    """torch.save, atomically: a killed run never leaves half a state."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_training_state(path: str | Path, device: torch.device | str = "cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def export_model(
    folder: str | Path,
    config: AgeCGANConfig,
    dtype: torch.dtype | None = None,
    **networks: nn.Module,
) -> None:
    """Write each network as <name>.safetensors plus config.json (the constructor arguments)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, network in networks.items():
        tensors = {}
        for key, value in network.state_dict().items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[key] = value.detach().cpu().contiguous()
        with atomic_write(folder / NETWORK_FILES[name]) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt", "network": name})
    with atomic_write(folder / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def load_config(folder: str | Path) -> AgeCGANConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}: not a model folder")
    return AgeCGANConfig.from_dict(json.loads(path.read_text()))


def load_network(folder: str | Path, name: str, device: torch.device | str = "cpu") -> nn.Module:
    """Build network `name` from folder/config.json and load its weights strictly, as fp32."""
    config = load_config(folder)
    network = NETWORK_CLASSES[name](config)
    path = Path(folder) / NETWORK_FILES[name]
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {folder}")
    tensors = load_file(path, device=str(device))
    expected = network.state_dict()
    tensors = {k: v.to(expected[k].dtype) if k in expected else v for k, v in tensors.items()}
    network.load_state_dict(tensors, strict=True)
    return network.to(device).eval()


@functools.cache
def installed_root() -> Path:
    """<prefix>/share/agecgan of this install, read from its RECORD (so a venv, --user or --prefix
    install all resolve); this interpreter's data prefix when no install records the files."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for file in importlib.metadata.distribution("agecgan").files or ():
            if file.match(f"{INSTALLED_FOLDER}/checkpoints/{CONFIG_NAME}"):
                return Path(file.locate()).resolve().parents[1]
    return Path(sysconfig.get_path("data")) / INSTALLED_FOLDER


def shipped_places(relative: str) -> list[Path]:
    """Where a shipped file or folder, named by its path in the repository, is looked for, in
    order: beside the package (a source checkout), then the install's copy."""
    return [SOURCE_ROOT / relative, installed_root() / relative]


def shipped(relative: str) -> Path:
    """The shipped file or folder `relative` ("checkpoints/config.json"): the first place in
    shipped_places that holds it, else the install's place. Never raises, so that a module can
    hold it as a default from import on; missing_shipped says, when it is used, what is wrong."""
    places = shipped_places(relative)
    return next((place for place in places if place.exists()), places[-1])


def missing_shipped(path: Path, checkout: str) -> str:
    """For the error when a shipped file or folder is not at `path`: every place it was looked
    for, and how to restore it (`git checkout <checkout>` in a checkout, else a reinstall)."""
    places = [path]
    for root in (installed_root(), SOURCE_ROOT):  # the install's first: .venv/ is in a checkout
        if path.is_relative_to(root):
            places = shipped_places(path.relative_to(root).as_posix())
            break
    return (
        f"looked at {' and '.join(map(str, places))}; restore with: git checkout {checkout} "
        "(in a source checkout), or reinstall agecgan from its source folder "
        "(pip install --force-reinstall .)"
    )
