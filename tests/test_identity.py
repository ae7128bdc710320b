"""Stage 3 per image: optimize_latent on a real photo with the real face-recognition network."""

import numpy as np
import pytest
import torch

from agecgan import Encoder, FaceRecognizer, Generator, one_hot
from agecgan.face_recognition import distance
from agecgan.identity import optimize_latent
from agecgan.networks import to_model_range


@pytest.fixture(scope="module")
def setup(aligner, astronaut):
    """Untrained recipe-sized E and G (no weights ship yet), the real FR, a real aligned face."""
    torch.manual_seed(0)
    E, G = Encoder().eval(), Generator().eval()
    FR = FaceRecognizer.from_pretrained()
    x = to_model_range(torch.from_numpy(np.array(aligner(astronaut).image))[None])
    y = one_hot(torch.tensor([2]))  # Eileen Collins was in her thirties
    return E, G, FR, x, y


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_identity_optimization_lowers_the_identity_distance(setup, optimizer):
    E, G, FR, x, y = setup
    calls = []
    result = optimize_latent(
        G,
        x,
        y,
        E=E,
        FR=FR,
        steps=5,
        lr=0.05 if optimizer == "adam" else 1,
        optimizer=optimizer,
        progress=lambda *args: calls.append(args),
    )
    with torch.no_grad():
        before = distance(FR(x), FR(G(result.z0, y)))
        after = distance(FR(x), FR(G(result.z, y)))
    assert after < before
    assert result.losses[-1] < result.losses[0]
    assert [c[:2] for c in calls] == [(i, 5) for i in range(1, 6)]


def test_pixelwise_objective_lowers_the_pixel_error(setup):
    E, G, _, x, y = setup
    result = optimize_latent(G, x, y, E=E, objective="pixelwise", steps=5, lr=0.05)
    with torch.no_grad():
        before = (G(result.z0, y) - x).pow(2).sum()
        after = (G(result.z, y) - x).pow(2).sum()
    assert after < before


def test_both_objective_is_the_identity_loss_plus_the_weighted_pixel_error(setup):
    E, G, FR, x, y = setup
    results = {
        weight: optimize_latent(G, x, y, E=E, FR=FR, objective="both", pixel_weight=weight, steps=4)
        for weight in (0.0, 100.0)
    }
    identity = optimize_latent(G, x, y, E=E, FR=FR, steps=4)
    assert torch.allclose(results[0.0].z, identity.z)  # no weight: the identity objective
    with torch.no_grad():
        start = G(identity.z0, y)
        fr_start = (FR(x) - FR(start)).pow(2).sum()
        assert results[100.0].losses[0] == pytest.approx(
            (fr_start + 100.0 * (start - x).pow(2).mean()).item(), rel=1e-4
        )
        pixel_error = {w: (G(r.z, y) - x).pow(2).mean() for w, r in results.items()}
    assert pixel_error[100.0] < pixel_error[0.0]
    assert results[100.0].losses[-1] < results[100.0].losses[0]


def test_networks_are_untouched_and_modes_restored(setup):
    E, G, FR, x, y = setup
    G.train()
    weights = {k: v.clone() for k, v in G.state_dict().items()}
    optimize_latent(G, x, y, E=E, FR=FR, steps=2)
    assert G.training and not E.training
    assert all(torch.equal(weights[k], v) for k, v in G.state_dict().items())
    assert all(p.requires_grad for p in G.parameters())
    G.eval()


def test_seeded_noise_is_deterministic_and_bad_arguments_are_refused(setup):
    E, G, FR, x, y = setup

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return optimize_latent(G, x, y, E=E, FR=FR, steps=1, init_noise=0.1, generator=generator).z

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    with pytest.raises(ValueError, match="needs FR"):
        optimize_latent(G, x, y, E=E)
    with pytest.raises(ValueError, match="objective"):
        optimize_latent(G, x, y, E=E, objective="vgg")
    with pytest.raises(ValueError, match="encoder E or a starting z0"):
        optimize_latent(G, x, y, FR=FR)


def test_a_stopped_optimization_leaves_the_networks_trainable(setup):
    """A stopped app run raises from progress(); G must not stay frozen (requires_grad)."""
    E, G, FR, x, y = setup
    G.requires_grad_(True)

    def stop(step, steps, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize_latent(G, x, y, E=E, FR=FR, steps=3, progress=stop)
    assert all(p.requires_grad for p in G.parameters())
