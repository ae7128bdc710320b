"""Age-cGAN's three trained networks: encoder E, generator G and discriminator D.

Sizes follow the Keras recipe exactly, so parameter counts (and results) are comparable:
E 18,278,180, G 34,852,099 and D 1,567,873 trainable parameters with the default config.
Faces are (N, 3, 64, 64) in [-1, 1]; z is (N, 100); the age condition y is (N, 6).
"""

import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from agecgan.ages import NUM_BUCKETS
from agecgan.align import DEFAULT_FRAMING, LEGACY_FRAMING


@dataclass(frozen=True)
class AgeCGANConfig:
    """Architecture of E, G and D; the defaults are the recipe's."""

    image_size: int = 64  # faces are aligned to 64x64, as in the paper
    image_channels: int = 3
    z_dim: int = 100  # latent size of the paper and the recipe
    num_ages: int = NUM_BUCKETS  # six buckets: 0-18, 19-29, 30-39, 40-49, 50-59, 60+
    encoder_widths: tuple[int, ...] = (32, 64, 128, 256)  # stride-2 convs, kernel 5
    encoder_hidden: int = 4096  # the dense layer before z
    generator_hidden: int = 2048  # first dense layer on concat(z, y)
    generator_widths: tuple[int, ...] = (256, 128, 64)  # 8x8 base, then one per upsampling
    discriminator_widths: tuple[int, ...] = (64, 128, 256, 512)  # stride-2 convs, kernel 3
    dropout: float = 0.2  # generator dense layers
    leaky_slope: float = 0.2  # every LeakyReLU
    # How the faces it learns from are cut (align.Framing's scale and eye height): the aligner
    # must cut a user's photo the same way. Set from the prepared data by training.
    framing: tuple[float, float] = (DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AgeCGANConfig":
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        # Model folders from before framings were recorded were all trained on the legacy one.
        tuples.setdefault("framing", (LEGACY_FRAMING.scale, LEGACY_FRAMING.eye_height))
        return cls(**tuples)


def batch_norm(num_features: int, keras_momentum: float = 0.99, dims: int = 2) -> nn.Module:
    """Batch norm with Keras semantics: its momentum m is PyTorch's 1 - m, epsilon 1e-3."""
    layer = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return layer(num_features, eps=1e-3, momentum=1.0 - keras_momentum)


class UpsampleConv2d(nn.Module):
    """Nearest-neighbour upsampling x2 followed by a k=5 "same" convolution, computed fast.

    The same function and parameters as nn.Upsample(2) + nn.Conv2d(k=5, padding=2), but each of
    the four output phases only ever sees 3x3 distinct input pixels, so it runs as one 3x3
    convolution on the small input with 4x the output channels and a pixel shuffle: 25/9 fewer
    multiply-adds. The 3x3 phase kernels are sums of the 5x5 weights.
    """

    # For output phase a (even, odd) along one axis: which of the 5 taps fall on input p-1, p, p+1.
    _TAP_SUMS = torch.tensor(
        [
            [[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
            [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 1, 1]],
        ],
        dtype=torch.float32,
    )

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        reference = nn.Conv2d(in_channels, out_channels, 5, padding=2)  # PyTorch's default init
        self.weight = nn.Parameter(reference.weight.detach().clone())  # (out, in, 5, 5)
        self.bias = nn.Parameter(reference.bias.detach().clone())

        self._cached: tuple | None = None  # (key, weight ref, bias ref, kernel, bias)

    def phase_kernels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (4 * out, in, 3, 3) kernel and (4 * out,) bias that the forward pass applies."""
        out_channels, in_channels = self.weight.shape[:2]
        taps = self._TAP_SUMS.to(self.weight)
        # (out, phase_row, phase_col, in, 3, 3), in the channel order pixel_shuffle expects
        kernel = torch.einsum("aij,ocjl,bkl->oabcik", taps, self.weight, taps)
        return kernel.reshape(out_channels * 4, in_channels, 3, 3), self.bias.repeat_interleave(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training, or gradients to z through a frozen G
            kernel, bias = self.phase_kernels()
        else:
            # Inference: rebuild the kernels only when the weights change (an optimizer step or
            # a load bumps their version), since at batch 1 rebuilding would dominate the time.
            # The weights are compared by identity (a weak reference), not by address: a
            # per-photo adaptation's weights (agecgan.adapt) may be freed and another's
            # allocated at the same address, with the same version.
            key = (self.weight._version, self.bias._version, self.weight.dtype, self.weight.device)
            cached = self._cached
            if (
                cached is None
                or cached[0] != key
                or cached[1]() is not self.weight
                or cached[2]() is not self.bias
            ):
                # Built in the weights' own dtype, outside any autocast, so that a kernel cached
                # under bf16 autocast never meets fp32 inputs later (conv2d casts per call).
                with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                    refs = (weakref.ref(self.weight), weakref.ref(self.bias))
                    self._cached = (key, *refs, *self.phase_kernels())
            kernel, bias = self._cached[3:]
        return nn.functional.pixel_shuffle(nn.functional.conv2d(x, kernel, bias, padding=1), 2)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=5, upsample=2"


def _check_face(x: torch.Tensor, config: AgeCGANConfig, name: str) -> None:
    expected = (config.image_channels, config.image_size, config.image_size)
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{name} expects faces of shape (N, {', '.join(map(str, expected))}), "
            f"got {tuple(x.shape)}"
        )


class Encoder(nn.Module):
    """E: face x -> latent z, trained to invert G (stage 2) and to keep identity (stage 3)."""

    def __init__(self, config: AgeCGANConfig | None = None):
        super().__init__()
        self.config = config = config or AgeCGANConfig()
        slope = config.leaky_slope
        layers: list[nn.Module] = []
        in_channels = config.image_channels
        for index, width in enumerate(config.encoder_widths):
            # Conv bias stays even before batch norm: the Keras original has it (and its counts).
            layers.append(nn.Conv2d(in_channels, width, 5, stride=2, padding=2))
            if index > 0:  # the recipe has no batch norm after the first conv
                layers.append(batch_norm(width))
            layers.append(nn.LeakyReLU(slope))
            in_channels = width
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.encoder_widths)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * side * side, config.encoder_hidden),
            batch_norm(config.encoder_hidden, dims=1),
            nn.LeakyReLU(slope),
            nn.Linear(config.encoder_hidden, config.z_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_face(x, self.config, "Encoder")
        return self.head(self.features(x))  # (N, z_dim)


class Generator(nn.Module):
    """G: latent z and age condition y -> face in [-1, 1]."""

    def __init__(self, config: AgeCGANConfig | None = None):
        super().__init__()
        self.config = config = config or AgeCGANConfig()
        slope, widths = config.leaky_slope, config.generator_widths
        self.base_side = config.image_size // 2 ** len(widths)  # 8 for 64x64 faces
        base_units = widths[0] * self.base_side**2
        self.project = nn.Sequential(
            nn.Linear(config.z_dim + config.num_ages, config.generator_hidden),
            nn.LeakyReLU(slope),
            nn.Dropout(config.dropout),
            nn.Linear(config.generator_hidden, base_units),
            batch_norm(base_units, dims=1),
            nn.LeakyReLU(slope),
            nn.Dropout(config.dropout),
        )
        blocks: list[nn.Module] = []
        for in_width, out_width in zip(widths, widths[1:], strict=False):
            blocks += [
                UpsampleConv2d(in_width, out_width),
                batch_norm(out_width, keras_momentum=0.8),  # the recipe's momentum here
                nn.LeakyReLU(slope),
            ]
        blocks += [UpsampleConv2d(widths[-1], config.image_channels), nn.Tanh()]
        self.synthesis = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.synthesis(self.features(z, y))  # (N, 3, 64, 64)

    def features(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The dense projection of (z, y): the (N, 256, 8, 8) input of the synthesis convs."""
        config = self.config
        if z.shape[1:] != (config.z_dim,) or y.shape != (z.shape[0], config.num_ages):
            raise ValueError(
                f"Generator expects z (N, {config.z_dim}) and y (N, "
                f"{config.num_ages}), got {tuple(z.shape)} and {tuple(y.shape)}"
            )
        h = self.project(torch.cat([z, y.to(z.dtype)], dim=1))
        return h.view(-1, self.config.generator_widths[0], self.base_side, self.base_side)


class Discriminator(nn.Module):
    """D: face x and age condition y -> logit of "real face of this age"."""

    def __init__(self, config: AgeCGANConfig | None = None):
        super().__init__()
        self.config = config = config or AgeCGANConfig()
        slope, widths = config.leaky_slope, config.discriminator_widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.image_channels, widths[0], 3, stride=2, padding=1),
            nn.LeakyReLU(slope),
        )
        layers: list[nn.Module] = []
        in_channels = widths[0] + config.num_ages  # y is tiled and joined after the stem
        for width in widths[1:]:
            layers += [
                nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
                batch_norm(width),
                nn.LeakyReLU(slope),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(widths)
        self.classify = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * side * side, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_face(x, self.config, "Discriminator")
        h = self.stem(x)  # (N, 64, 32, 32)
        y_map = y.to(h.dtype)[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        h = torch.cat([h, y_map], dim=1)  # (N, 70, 32, 32)
        return self.classify(self.features(h)).squeeze(1)  # (N,) logits


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the networks' input range."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(faces: torch.Tensor) -> torch.Tensor:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return (
        faces.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    )


def count_trainable(module: nn.Module) -> int:
    """Trainable parameters; batch-norm running statistics are buffers and do not count."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
