"""The three networks: the recipe's sizes, shapes, and the fast upsampling convolution."""

import pytest
import torch
from helpers import TINY
from torch import nn

from agecgan import AgeCGANConfig, Discriminator, Encoder, Generator
from agecgan.networks import UpsampleConv2d, count_trainable


def test_trainable_parameter_counts_equal_the_keras_originals():
    assert count_trainable(Encoder()) == 18_278_180
    assert count_trainable(Generator()) == 34_852_099
    assert count_trainable(Discriminator()) == 1_567_873


def test_shapes_and_ranges():
    torch.manual_seed(0)
    E, G, D = Encoder().eval(), Generator().eval(), Discriminator().eval()
    z, y = torch.randn(3, 100), torch.eye(6)[[0, 2, 5]]
    with torch.no_grad():
        x = G(z, y)
        assert x.shape == (3, 3, 64, 64)
        assert x.min() >= -1 and x.max() <= 1  # tanh output
        assert E(x).shape == (3, 100)
        logits = D(x, y)
    assert logits.shape == (3,)
    # D returns logits, not probabilities: the loss applies the sigmoid.
    assert not isinstance(list(D.classify)[-1], nn.Sigmoid)


def test_batch_norm_uses_keras_semantics():
    norms = [m for m in Generator().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.eps == 1e-3 for m in norms)
    # Keras momentum 0.99 (the default) and 0.8 (G's upsampling blocks) in PyTorch's convention.
    assert sorted({round(m.momentum, 6) for m in norms}) == [0.01, 0.2]
    assert {round(m.momentum, 6) for m in Encoder().modules() if isinstance(m, nn.BatchNorm2d)} == {
        0.01
    }


def test_upsample_conv_equals_upsample_then_conv():
    torch.manual_seed(0)
    fast = UpsampleConv2d(16, 8)
    reference = nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(16, 8, 5, padding=2)
    )
    reference[1].weight.data.copy_(fast.weight.data)
    reference[1].bias.data.copy_(fast.bias.data)
    x = torch.randn(2, 16, 7, 9)
    assert torch.allclose(fast(x), reference(x), atol=1e-5)
    # Gradients reach the 5x5 weights exactly as through the plain layers.
    fast(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert torch.allclose(fast.weight.grad, reference[1].weight.grad, rtol=1e-4, atol=1e-4)


def test_networks_reject_wrong_shapes():
    with pytest.raises(ValueError, match="Encoder expects"):
        Encoder()(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Generator expects"):
        Generator()(torch.zeros(1, 100), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="Discriminator expects"):
        Discriminator()(torch.zeros(1, 1, 64, 64), torch.zeros(1, 6))


def test_config_round_trip_and_custom_widths():
    config = TINY
    assert AgeCGANConfig.from_dict(config.to_dict()) == config
    G = Generator(config)
    assert G(torch.randn(2, 100), torch.eye(6)[:2]).shape == (2, 3, 64, 64)
    assert count_trainable(G) < 100_000


def test_inference_cache_follows_weight_updates():
    torch.manual_seed(0)
    layer = UpsampleConv2d(4, 3)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        before = layer(x)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).sum().backward()
    optimizer.step()
    with torch.inference_mode():
        after = layer(x)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, layer(x), atol=1e-6)  # the cached kernel is the fresh one
    # Gradients to the input through a frozen layer never use inference-mode tensors.
    layer.requires_grad_(False)
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None


def test_inference_cache_is_independent_of_autocast():
    """A frozen G used under bf16 autocast, then in fp32 (stage 2's sample grid), and back."""
    torch.manual_seed(0)
    G = Generator(TINY).eval()
    z, y = torch.randn(2, 100), torch.eye(6)[:2]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = G(z, y)  # the first call builds the cached kernels, under autocast
        plain = G(z, y)
    with torch.enable_grad():
        reference = G(z, y)  # no cache: kernels rebuilt from the weights
    assert mixed.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.allclose(plain, reference, atol=1e-6)
    assert torch.allclose(mixed.float(), reference, atol=0.05)


def test_inference_kernels_follow_the_weights_they_were_built_from():
    """The no-grad kernel cache must never serve kernels of other weights: a per-photo
    adaptation runs the layer with its own tensors (functional_call), then the shipped ones."""
    torch.manual_seed(0)
    layer = UpsampleConv2d(4, 3)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        shipped = layer(x)
        for _ in range(3):  # fresh tensors each time, possibly at a freed tensor's address
            other = {"weight": torch.randn_like(layer.weight), "bias": torch.randn(3)}
            swapped = torch.func.functional_call(layer, other, (x,))
            with torch.enable_grad():  # no cache on this path: the reference
                expected = torch.func.functional_call(layer, other, (x,))
            torch.testing.assert_close(swapped, expected.detach())
        torch.testing.assert_close(layer(x), shipped)
