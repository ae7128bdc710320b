"""Stage 3, per image: latent vector optimization that keeps identity (the paper's form).

Start from z0 = E(x) and move z, with G and FR frozen, so that FR sees the same person in x
and in its reconstruction G(z, y_x): minimize ||FR(x) - FR(G(z, y_x))||^2 over z only. The
"pixelwise" objective ||x - G(z, y_x)||^2 is the paper's baseline for comparison; "both" adds
the mean squared pixel error, weighted, to the identity objective, since FR alone can be
satisfied by a z whose face hardly changes.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

OBJECTIVES = ("identity", "pixelwise", "both")
# "both": FR's squared distance (about 0.3 for a reconstruction) plus this times the mean squared
# pixel error in [-1, 1] (about 0.05), so that the two terms start at about the same size.
PIXEL_WEIGHT = 10.0
# Defaults for the pipeline, the app and the evaluation alike: 20 Adam steps take about 1.4 s
# for one face with the recipe's G and FR on one CPU core, and gain most in the first steps.
DEFAULT_STEPS = 20
DEFAULT_LR = 0.05  # z is ~N(0, 1): 20 steps can move each coordinate by up to about 1
OPTIMIZERS = ("adam", "lbfgs")


@dataclass
class LatentResult:
    """The optimized latents and how the objective went."""

    z: torch.Tensor  # (N, z_dim), detached
    z0: torch.Tensor  # (N, z_dim): E(x), the start
    losses: list[float]  # the objective (mean over the batch) before each step, then at the end


def optimize_latent(
    G: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    E: nn.Module | None = None,
    z0: torch.Tensor | None = None,
    FR: nn.Module | None = None,
    objective: str = "identity",
    pixel_weight: float = PIXEL_WEIGHT,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    optimizer: str = "adam",
    init_noise: float = 0.0,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> LatentResult:
    """Optimize z for faces x (N, 3, 64, 64) in [-1, 1] with their ages y (N, 6).

    z starts at z0, or E(x) when z0 is None, plus init_noise * N(0, 1) drawn from `generator`
    (a CPU torch.Generator; init_noise is 0 by default: fully deterministic). G, E and FR are
    evaluated in eval mode and never updated; their modes are restored afterwards.
    progress(step, steps, loss) is called after every step.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, not {optimizer!r}")
    if objective != "pixelwise" and FR is None:
        raise ValueError(f"the {objective} objective needs FR, a face-recognition network")
    modes = {module: module.training for module in (G, E, FR) if module is not None}
    # Restored in `finally`, even when progress() raises (a stopped app run): never a frozen G.
    needs_grad = {p: p.requires_grad for module in modes for p in module.parameters()}
    try:
        for module in modes:
            module.eval()
        with torch.no_grad():
            if z0 is None:
                if E is None:
                    raise ValueError("give the encoder E or a starting z0")
                z0 = E(x)
            z0 = z0.float()
            target = FR(x).float() if objective != "pixelwise" else None
        start = z0.clone()
        if init_noise:  # drawn on the CPU so that a CPU generator gives the same z everywhere
            start += init_noise * torch.randn(start.shape, generator=generator).to(start.device)
        z = start.clone().requires_grad_(True)

        def loss_of(z: torch.Tensor) -> torch.Tensor:
            faces = G(z, y)
            if objective == "pixelwise":  # squared L2 per image, averaged over the batch
                return (faces.float() - x.float()).pow(2).flatten(1).sum(1).mean()
            loss = (FR(faces).float() - target).pow(2).sum(1).mean()
            if objective == "both":
                loss = loss + pixel_weight * (faces.float() - x.float()).pow(2).mean()
            return loss

        # Only z is a leaf that requires grad; G's, E's and FR's weights are untouched.
        for module in modes:
            module.requires_grad_(False)
        losses: list[float] = []
        if optimizer == "adam":
            opt = torch.optim.Adam([z], lr=lr)
            for step in range(steps):
                loss = loss_of(z)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if progress:
                    progress(step + 1, steps, losses[-1])
        else:
            opt = torch.optim.LBFGS([z], lr=lr, max_iter=1, line_search_fn="strong_wolfe")
            for step in range(steps):

                def closure() -> torch.Tensor:
                    opt.zero_grad(set_to_none=True)
                    loss = loss_of(z)
                    loss.backward()
                    return loss

                losses.append(opt.step(closure).item())
                if progress:
                    progress(step + 1, steps, losses[-1])
        with torch.no_grad():
            losses.append(loss_of(z).item())
        return LatentResult(z=z.detach(), z0=z0.detach(), losses=losses)
    finally:
        for module, was_training in modes.items():
            module.train(was_training)
        for parameter, flag in needs_grad.items():
            parameter.requires_grad_(flag)
