"""Per-photo adaptation of G: G learns to draw one person while its age condition keeps working.

The idea of Local Manifold Adaptation (Antipov, Baccouche and Dugelay, IJCB 2017) and of pivotal
tuning (Roich et al., 2021): once z is found for a photo x of bucket y, a few Adam steps tune a
copy of G's last synthesis blocks (the upsampling convolutions after the dense projection: the
last two hold 0.2 M of G's 34.9 M weights) so that G'(z, y) draws x. Two terms hold G' to the
shipped G where the photo says nothing:
- the age change is kept: for the same z, G'(z, y_k) - G'(z, y) stays G(z, y_k) - G(z, y) for
  the other buckets k, so each age moves this person's face as it moved G's face;
- elsewhere G' stays G: on a few random latents and ages, G'(z_r, y_r) stays G(z_r, y_r).
The blocks before the tuned ones are computed once, so a step costs only the tuned blocks.
The shipped G never changes: the tuned weights come back in an Adaptation, and `generate` runs
G with them on a private copy of the tuned blocks. (Not torch.func.functional_call: it swaps the
weights into the shared module for the call, so two requests at once would draw, and train,
with each other's weights.)
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from agecgan.ages import NUM_BUCKETS, one_hot
from agecgan.networks import UpsampleConv2d

# 20 steps by default: on 500 UTKFace test faces, drawn in detail, they won "both at once" as
# 30 did (21.5% against 21.4%, 19.3% without), in 2.2 s a face against 2.7 (README, "Likeness").
# Only the step count was compared; the rates and weights below are first choices.
DEFAULT_ADAPT_STEPS = 20
DEFAULT_ADAPT_LR = 3e-4
PIXEL_WEIGHT = 1.0  # mean |G'(z, y) - x| over pixels in [-1, 1]
IDENTITY_WEIGHT = 0.5  # squared distance of FR embeddings (dlib: same person below 0.36)
AGE_CHANGE_WEIGHT = 1.0  # mean |(G'(z, y_k) - G'(z, y)) - (G(z, y_k) - G(z, y))|
LOCALITY_WEIGHT = 1.0  # mean |G'(z_r, y_r) - G(z_r, y_r)|
LOCALITY_SAMPLES = 2
AGE_SAMPLES = 2  # other buckets per step, drawn at random: all five would cost 2.5x as much
TUNED_BLOCKS = 2  # of G's three upsampling blocks, the last ones


def split_at(G: nn.Module, blocks: int) -> int:
    """Index in G.synthesis where its last `blocks` upsampling blocks begin."""
    starts = [i for i, layer in enumerate(G.synthesis) if isinstance(layer, UpsampleConv2d)]
    if not 1 <= blocks <= len(starts):
        raise ValueError(f"blocks must be from 1 to {len(starts)}, not {blocks}")
    return starts[-blocks]


@dataclass
class Adaptation:
    """G's synthesis weights tuned to one photo (on the CPU) and how the objective went."""

    start: int  # index in G.synthesis of the first tuned layer
    synthesis: dict[str, torch.Tensor]  # parameter name in G.synthesis[start:] -> tuned tensor
    steps: int
    losses: list[float]  # the objective before each step


def adapt_generator(
    G: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    *,
    steps: int,
    FR: nn.Module | None = None,
    blocks: int = TUNED_BLOCKS,
    lr: float = DEFAULT_ADAPT_LR,
    pixel_weight: float = PIXEL_WEIGHT,
    identity_weight: float = IDENTITY_WEIGHT,
    age_change_weight: float = AGE_CHANGE_WEIGHT,
    locality_weight: float = LOCALITY_WEIGHT,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Adaptation:
    """Tune G's synthesis to one face x (1, 3, 64, 64) in [-1, 1] of age y (1, 6) at latent z.

    G (and FR, needed when identity_weight > 0) run in eval mode and keep their weights; their
    modes are restored afterwards. The random latents of the locality term come from `seed`,
    so one photo always adapts the same way. progress(step, steps, loss) follows the steps.
    """
    if steps < 0:
        raise ValueError(f"steps must be 0 or more, not {steps}")
    if identity_weight > 0 and FR is None:
        raise ValueError("the identity term needs FR, a face-recognition network")
    modes = {module: module.training for module in (G, FR) if module is not None}
    try:
        for module in modes:
            module.eval()
        device = x.device
        start = split_at(G, blocks)
        frozen, tuned_layers = G.synthesis[:start], G.synthesis[start:]
        own = int(y.argmax(1))
        others = torch.tensor([b for b in range(NUM_BUCKETS) if b != own])
        noise = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # Everything before the tuned blocks is computed once: the person at their own age
            # and at the five others, and the random (z_r, y_r) of the locality term.
            z_random = torch.randn(LOCALITY_SAMPLES, z.shape[1], generator=noise).to(device)
            y_random = one_hot(torch.randint(0, NUM_BUCKETS, (LOCALITY_SAMPLES,), generator=noise))
            conditions = torch.cat([y, one_hot(others).to(device), y_random.to(device)])
            latents = torch.cat([z.expand(1 + len(others), -1), z_random])
            inputs = frozen(G.features(latents, conditions))
            shipped = tuned_layers(inputs).float()
            shipped_change = shipped[1 : 1 + len(others)] - shipped[:1]
            target = FR(x).float() if identity_weight > 0 else None
        tuned = copy.deepcopy(tuned_layers).requires_grad_(True)  # this request's own
        optimizer = torch.optim.Adam(tuned.parameters(), lr=lr)
        random_rows = torch.arange(1 + len(others), len(inputs))
        losses: list[float] = []
        for step in range(steps):
            ages = 1 + torch.randperm(len(others), generator=noise)[:AGE_SAMPLES]
            rows = torch.cat([torch.zeros(1, dtype=torch.long), ages, random_rows])
            faces = tuned(inputs[rows]).float()
            loss = pixel_weight * (faces[:1] - x.float()).abs().mean()
            if target is not None:
                loss = (
                    loss + identity_weight * (FR(faces[:1]).float() - target).pow(2).sum(1).mean()
                )
            change = faces[1 : 1 + len(ages)] - faces[:1]
            loss = loss + age_change_weight * (change - shipped_change[ages - 1]).abs().mean()
            elsewhere = faces[1 + len(ages) :] - shipped[random_rows]
            loss = loss + locality_weight * elsewhere.abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if progress:
                progress(step + 1, steps, losses[-1])
        weights = {name: tensor.detach().cpu() for name, tensor in tuned.named_parameters()}
        return Adaptation(start=start, synthesis=weights, steps=steps, losses=losses)
    finally:
        for module, was_training in modes.items():
            module.train(was_training)


def generate(
    G: nn.Module, z: torch.Tensor, y: torch.Tensor, adaptation: Adaptation | None = None
) -> torch.Tensor:
    """G(z, y), or the adapted G'(z, y) when an adaptation is given; G itself is untouched."""
    if adaptation is None or adaptation.steps == 0:
        return G(z, y)
    start = adaptation.start
    # Ordinary tensors even under inference_mode: the blocks' kernel cache reads their versions.
    with torch.inference_mode(False):
        tuned = copy.deepcopy(G.synthesis[start:])  # 0.2 M weights, under a millisecond to copy
        tuned.load_state_dict(adaptation.synthesis, strict=False)  # parameters; buffers are G's
    return tuned(G.synthesis[:start](G.features(z, y)))
