"""Run under torchrun by test_training: a few distributed stage-1 steps, then dump each rank."""

import os
import sys
from pathlib import Path

import torch

from agecgan.networks import Generator
from agecgan.training import GanOptions, train_gan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY  # noqa: E402

data, out = Path(sys.argv[1]), Path(sys.argv[2])
rank = int(os.environ["RANK"])
torch.manual_seed(0)
initial = Generator(TINY).state_dict()
result = train_gan(
    GanOptions(
        data=str(data),
        run_dir=str(out / "run"),
        config=TINY.to_dict(),
        batch_size=4,
        max_steps=3,
        save_every=2,
        sample_every=100,
        progress=False,
    )
)
torch.save(
    {
        "step": 3,
        "initial_generator": initial,
        "generator": result.networks["generator"].state_dict(),
        "discriminator": {
            k: v
            for k, v in result.networks["discriminator"].state_dict().items()
            if "running" not in k and "num_batches" not in k
        },
    },
    out / f"rank{rank}.pt",
)
