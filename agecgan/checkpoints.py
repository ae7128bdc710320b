"""Saving and loading: atomic training states, and finished weights as safetensors + config.json.

Nothing here unpickles code: training states load with torch.load(weights_only=True) and
finished networks are plain safetensors, loaded strictly.
"""

import json
import os
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


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
    os.replace(tmp, path)


def save_training_state(path: str | Path, state: dict) -> None:
    """torch.save to a temporary name, then rename: a killed run never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    _replace_atomically(tmp, path)


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
        path = folder / NETWORK_FILES[name]
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt", "network": name})
        _replace_atomically(tmp, path)
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    _replace_atomically(tmp, folder / CONFIG_NAME)


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
