"""Speed of Age-cGAN's training and inference on this machine, printed as figures and ratios.

    python bench/bench_training.py [--repeats 5] [--steps 4]

Measures, side by side in one run: the machine's ceiling (large fp32 and bf16 matmuls), stage-1
training throughput at batch 128 for a plain eager port (upsample + 5x5 conv, contiguous
memory) and for the shipped networks in fp32 and bf16 autocast, stage-2 throughput, and
generator inference at batch 1 and 64. Each figure is the median of --repeats timings, each
over --steps steps after warm-up. Synthetic inputs: speed does not depend on pixel values.
"""

import argparse
import copy
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from agecgan.ages import one_hot
from agecgan.networks import Discriminator, Encoder, Generator, UpsampleConv2d
from agecgan.training import (
    EncoderOptions,
    GanOptions,
    Runtime,
    encoder_step,
    gan_step,
    memory_format_of,
)

# The recipe's Keras code (TensorFlow 2.21, oneDNN) on these 2 cores at batch 128, as measured
# for the issue: stage 1 median (58-73 across runs), stage 2, G inference at batch 1 and 64.
KERAS_PEER = {"stage1": 64.0, "stage2": 267.0, "infer1": 126.0, "infer64": 415.0}


def median_rate(work, items: int, steps: int, repeats: int) -> float:
    """Median items/s of `work` over `repeats` timings of `steps` calls, after 2 warm-up calls."""
    for _ in range(2):
        work()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            work()
        rates.append(items * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def count_flops(work) -> int:
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


def matmul_ceiling(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    rate = median_rate(lambda: torch.mm(a, b), 1, 3, repeats)
    return rate * 2 * size**3


def plain_generator(G: Generator) -> Generator:
    """The same G with each fast UpsampleConv2d swapped for nn.Upsample + nn.Conv2d(k=5)."""
    G = copy.deepcopy(G)
    for index, module in enumerate(G.synthesis):
        if isinstance(module, UpsampleConv2d):
            out_channels, in_channels = module.weight.shape[:2]
            conv = nn.Conv2d(in_channels, out_channels, 5, padding=2)
            conv.weight.data.copy_(module.weight.data)
            conv.bias.data.copy_(module.bias.data)
            G.synthesis[index] = nn.Sequential(nn.Upsample(scale_factor=2), conv)
    return G


def stage1(
    precision: str, channels_last: bool, plain: bool, batch: int, steps: int, repeats: int
) -> tuple[float, int]:
    torch.manual_seed(0)
    options = GanOptions(precision=precision, channels_last=channels_last, batch_size=batch)
    runtime = Runtime(torch.device("cpu"))
    G, D = Generator(), Discriminator()
    if plain:
        G = plain_generator(G)
    fmt = memory_format_of(options)
    G, D = G.to(memory_format=fmt), D.to(memory_format=fmt)
    optimizer_g = torch.optim.Adam(G.parameters(), 2e-4, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
    x = (torch.rand(batch, 3, 64, 64) * 2 - 1).contiguous(memory_format=fmt)
    y = one_hot(torch.randint(0, 6, (batch,)))
    noise = torch.Generator().manual_seed(0)

    def step():
        gan_step(G, D, G, D, optimizer_g, optimizer_d, x, y, noise, options, runtime)

    flops = count_flops(step)
    return median_rate(step, batch, steps, repeats), flops


def stage2(precision: str, batch: int, steps: int, repeats: int) -> tuple[float, int]:
    torch.manual_seed(0)
    options = EncoderOptions(precision=precision, batch_size=batch)
    runtime = Runtime(torch.device("cpu"))
    fmt = memory_format_of(options)
    G = Generator().eval().requires_grad_(False).to(memory_format=fmt)
    E = Encoder().to(memory_format=fmt)
    optimizer = torch.optim.Adam(E.parameters(), 1e-3)
    z, y = torch.randn(batch, 100), one_hot(torch.randint(0, 6, (batch,)))

    def step():
        encoder_step(E, G, optimizer, z, y, options, runtime)

    flops = count_flops(step)
    return median_rate(step, batch, steps, repeats), flops


def inference(precision: str, batch: int, steps: int, repeats: int) -> float:
    """G alone, eval mode; bf16 casts the weights once (autocast would recast them per call)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    G = Generator().eval().to(memory_format=torch.channels_last, dtype=dtype)
    z, y = torch.randn(batch, 100, dtype=dtype), one_hot(torch.randint(0, 6, (batch,)))

    def run():
        with torch.inference_mode():
            G(z, y.to(dtype))

    return median_rate(run, batch, steps, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure (median)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timing")
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    steps, repeats, batch = args.steps, args.repeats, args.batch
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()}; median of {repeats} timings\n"
    )

    ceiling = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    for name, value in ceiling.items():
        print(f"ceiling  {name} matmul 4096^3           {value / 1e9:8.1f} GFLOP/s")
    print()

    print(f"stage 1 (G and D, batch {batch})           img/s  GFLOP/s  of ceiling  vs Keras peer")
    variants = [
        ("plain eager port, fp32", "fp32", False, True),
        ("shipped, fp32", "fp32", True, False),
        ("shipped, bf16 autocast", "bf16", True, False),
    ]
    recipe_flops = None
    for label, precision, channels_last, plain in variants:
        rate, flops = stage1(precision, channels_last, plain, batch, steps, repeats)
        recipe_flops = recipe_flops or flops  # the plain port does the recipe's arithmetic
        achieved = rate / batch * flops
        print(
            f"  {label:<36} {rate:6.1f}  {achieved / 1e9:7.1f}  "
            f"{achieved / ceiling[precision]:9.0%}  {rate / KERAS_PEER['stage1']:10.2f}x"
        )
    print(
        f"  (recipe arithmetic {recipe_flops / batch / 1e9:.2f} GFLOP per image; the shipped G "
        "computes each upsample + 5x5 conv as a 3x3 conv + pixel shuffle, same function)\n"
    )

    print(f"stage 2 (E on G's faces, batch {batch})    img/s  GFLOP/s  of ceiling  vs Keras peer")
    for precision in ("fp32", "bf16"):
        rate, flops = stage2(precision, batch, steps, repeats)
        achieved = rate / batch * flops
        print(
            f"  {precision:<36} {rate:6.1f}  {achieved / 1e9:7.1f}  "
            f"{achieved / ceiling[precision]:9.0%}  {rate / KERAS_PEER['stage2']:10.2f}x"
        )
    print()

    print("generator inference                     img/s  vs Keras peer")
    for precision in ("fp32", "bf16"):
        for size, key in ((1, "infer1"), (64, "infer64")):
            rate = inference(precision, size, max(steps * 8 // size, 4), repeats)
            print(f"  {precision}, batch {size:<27} {rate:7.1f}  {rate / KERAS_PEER[key]:10.2f}x")


if __name__ == "__main__":
    main()
