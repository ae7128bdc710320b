"""Age-cGAN's losses, written on logits so that the sigmoid is applied stably."""

import torch
import torch.nn.functional as F


def adversarial_loss(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy of D's logits against a constant (possibly smoothed) label.

    With t the target and l the logit: t * softplus(-l) + (1 - t) * softplus(l), which is
    -t log sigmoid(l) - (1 - t) log(1 - sigmoid(l)) without overflow for large |l|.
    """
    return F.binary_cross_entropy_with_logits(
        logits.float(), torch.full_like(logits.float(), target)
    )


def euclidean_loss(z_predicted: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Stage 2's loss: the mean over the batch of ||E(G(z, y)) - z||_2 (not squared)."""
    return (z_predicted.float() - z.float()).pow(2).sum(dim=1).sqrt().mean()
