"""Speed of Age-cGAN's training and inference here, beside the book's Keras code run in the same
invocation, with the ratios and targets of issue 14.

    python bench/bench_training.py [--repeats 5] [--steps 4] [--threads N] [--quick]

Prints the CPU and its bf16 support, the precision "auto" picks, the machine's matmul ceilings
(fp32, bf16), then per workload the images/s of the Keras peer (bench/keras_peer.py, run as a
subprocess in the peer venv that `make peer` installs) and of ours: stage 1 at batch 128 for a
plain eager port (upsample + 5x5 conv, contiguous memory) and the shipped networks in fp32 and
bf16 autocast, stage 2, and generator inference at batch 1 and 64. Timings are interleaved
(peer, ours, ours, ..., peer, ...) so that drift hits all alike; each figure is the median of
--repeats timings of --steps steps after warm-up, each ratio the median of the per-round ratios.
No peer venv: the bench says so and prints no ratio. Where a stage-1 target is missed it prints
a profile of one step. Synthetic inputs: speed does not depend on pixel values.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from agecgan import training
from agecgan.ages import NUM_BUCKETS, one_hot
from agecgan.checkpoints import export_model
from agecgan.networks import Discriminator, Encoder, Generator, UpsampleConv2d, count_trainable
from agecgan.prepare import save_cache
from agecgan.runtime import cpu_model, native_bf16, resolve_precision
from agecgan.training import EncoderOptions, GanOptions

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).resolve().with_name("keras_peer.py")
PEER_PYTHON = ROOT / ".venv-keras" / "bin" / "python"  # made by `make peer`
CPU = torch.device("cpu")

# Issue 14's targets for stage 1 at batch 128.
TARGET_FP32 = 1.25  # times the Keras peer, in fp32
TARGET_BF16 = 2.5  # times the Keras peer, with bf16 autocast where the CPU has native bf16
TARGET_CEILING = 0.30  # share of the measured matmul ceiling, in the precision "auto" picks


# ---- what is timed --------------------------------------------------------------------------


@dataclass
class Work:
    """One timed workload: `step()` processes `items` images; `rates` fills round by round."""

    label: str
    items: int
    step: Callable[[], None]
    precision: str = "fp32"
    flops: int = 0  # counted arithmetic of one step (0: not counted)
    shipped: bool = True  # ours as the package runs it (the rows "auto" chooses between)
    rates: list[float] = field(default_factory=list)

    def warm_up(self, calls: int) -> None:
        for _ in range(calls):
            self.step()

    def time(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.rates.append(self.items * steps / (time.perf_counter() - start))

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


class PeerWork(Work):
    """A workload of the Keras peer: it runs and times the steps in its own process."""

    def __init__(self, peer: "KerasPeer", name: str, items: int):
        super().__init__("Keras peer (the book's code), fp32", items, lambda: None)
        self.peer, self.name = peer, name

    def warm_up(self, calls: int) -> None:
        self.peer.rate(self.name, calls)

    def time(self, steps: int) -> None:
        self.rates.append(self.peer.rate(self.name, steps))


class KerasPeer:
    """The Keras recipe in its own venv and process, timed on request over JSON lines."""

    def __init__(self, python: Path, threads: int, batch: int):
        # TF's chatter goes to a file that lives as long as the peer; shown if the peer dies.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("PYTHONPATH", None)  # the peer needs nothing of ours
        command = [str(python), str(PEER_SCRIPT), "--threads", str(threads), "--batch", str(batch)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"the Keras peer stopped (exit {self.process.wait()}):\n{tail}")
        return json.loads(line)

    def rate(self, name: str, steps: int) -> float:
        """Images/s of `steps` calls of the peer's workload `name`, timed in the peer."""
        self.process.stdin.write(json.dumps({"run": name, "steps": steps}) + "\n")
        self.process.stdin.flush()
        return self._answer()["rate"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
        self.log.close()


def start_peer(python: Path, threads: int, batch: int) -> KerasPeer | None:
    """The running peer, or None (and a line saying so) when its venv is not installed."""
    if not python.exists():
        print(
            f"Keras peer: peer not installed ({python} is missing; `make peer` installs it). "
            "No ratios: they come only from a peer measured in the same run.\n"
        )
        return None
    peer = KerasPeer(python, threads, batch)
    info = peer.info
    ours = {
        "encoder": count_trainable(Encoder()),
        "generator": count_trainable(Generator()),
        "discriminator": count_trainable(Discriminator()),
    }
    if info["params"] != ours:  # the peer must be the recipe's networks, not a look-alike
        peer.close()
        raise SystemExit(f"the Keras networks differ from ours: {info['params']} vs {ours}")
    if failed := [what for what, holds in info["check"].items() if not holds]:
        peer.close()  # a peer that trains the wrong networks would be timed doing other work
        raise SystemExit(f"the Keras peer does not train as the recipe: not {', '.join(failed)}")
    print(
        f"Keras peer: TensorFlow {info['tensorflow']}, Keras {info['keras']} ({info['backend']} "
        f"backend, oneDNN {'on' if info['onednn'] else 'off'}, XLA "
        f"{'on' if info['jit_compile'] else 'off'}), TensorFlow intra-op "
        f"{info['intra_op_threads']}, inter-op {info['inter_op_threads']} threads\n"
        f"  trainable parameters E {ours['encoder']:,}, G {ours['generator']:,}, "
        f"D {ours['discriminator']:,}: the same as ours; self-check passed (each train_on_batch "
        "updates the networks the recipe's does)\n"
    )
    return peer


def interleave(works: list[Work], steps: int, repeats: int, warm: int) -> None:
    """Warm every workload, then time them in turn, round after round."""
    for work in works:
        work.warm_up(warm)
    for _ in range(repeats):
        for work in works:
            work.time(steps)


def ratio(ours: Work, peer: Work) -> float:
    """Median of the per-round ratios: each pairs timings taken moments apart."""
    return statistics.median(a / b for a, b in zip(ours.rates, peer.rates, strict=True))


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_ceiling(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a large square matmul: what this CPU reaches at best in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    work = Work("ceiling", 1, lambda: torch.mm(a, b))
    work.warm_up(1)
    for _ in range(repeats):
        work.time(3)
    return work.rate * 2 * size**3


# ---- ours: the training stages themselves, and G alone -----------------------------------


class TrainingWork(Work):
    """A training stage timed as `python train.py` runs it: the stage's own function on
    synthetic faces, for warm-up plus `steps` steps per timing; the rate is the median of the
    run's own per-step images/s after warm-up (building the networks is not timed)."""

    def __init__(self, label: str, items: int, train, options, precision: str, **kwargs):
        one_step = lambda: train(replace(options, max_steps=1))  # noqa: E731 (counted, profiled)
        super().__init__(label, items, one_step, precision, **kwargs)
        self.train_function, self.options, self.warm = train, options, 2

    def train(self, steps: int) -> list[float]:
        options = replace(self.options, max_steps=self.warm + steps)
        return self.train_function(options).speeds[self.warm :]

    def warm_up(self, calls: int) -> None:
        self.warm = calls

    def time(self, steps: int) -> None:
        self.rates.append(statistics.median(self.train(steps)))


class PlainGenerator(Generator):
    """The same G with each fast UpsampleConv2d swapped for nn.Upsample + nn.Conv2d(k=5)."""

    def __init__(self, config=None):
        super().__init__(config)
        for index, module in enumerate(self.synthesis):
            if isinstance(module, UpsampleConv2d):
                out_channels, in_channels = module.weight.shape[:2]
                conv = nn.Conv2d(in_channels, out_channels, 5, padding=2)
                conv.weight.data.copy_(module.weight.data)
                conv.bias.data.copy_(module.bias.data)
                self.synthesis[index] = nn.Sequential(nn.Upsample(scale_factor=2), conv)


def synthetic_faces(folder: Path, count: int = 1024) -> Path:
    """A prepared-dataset folder of random faces: speed does not depend on pixel values."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    save_cache(
        folder / "faces.npz",
        images=rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8),
        ages=np.full(count, 30, np.int16),
        buckets=(np.arange(count) % NUM_BUCKETS).astype(np.int8),
        split=np.zeros(count, np.int8),
        names=np.array([f"{i}.jpg" for i in range(count)]),
    )
    return folder


def quiet_run(folder: Path) -> dict:
    """Options that time only training: no progress bar, grids, saved states or snapshots."""
    return dict(run_dir=str(folder), overwrite=True, progress=False, sample_every=0, save_every=0)


def stage1_work(label: str, precision: str, plain: bool, batch: int, folder: Path) -> Work:
    """train_gan with the recipe's options; `plain`: with PlainGenerator and contiguous memory."""
    options = GanOptions(
        data=str(synthetic_faces(folder / "data")),
        precision=precision,
        channels_last=not plain,
        batch_size=batch,
        **quiet_run(folder / "run"),
    )

    def train(options: GanOptions):
        with mock.patch.object(training, "Generator", PlainGenerator if plain else Generator):
            return training.train_gan(options)

    work = TrainingWork(label, batch, train, options, precision, shipped=not plain)
    work.flops = count_flops(work.step)
    return work


def stage2_work(label: str, precision: str, batch: int, folder: Path) -> Work:
    """train_encoder: E learns z back from a frozen (random) G's faces."""
    generator = folder / "generator"
    if not (generator / "config.json").exists():
        torch.manual_seed(0)
        export_model(generator, Generator().config, generator=Generator())
    options = EncoderOptions(
        generator=str(generator),
        precision=precision,
        batch_size=batch,
        pairs=batch * 16,
        epochs=100,
        **quiet_run(folder / "run"),
    )
    work = TrainingWork(label, batch, training.train_encoder, options, precision)
    work.flops = count_flops(work.step)
    return work


def inference_work(label: str, precision: str, batch: int) -> Work:
    """G alone, eval mode; bf16 casts the weights once (autocast would recast them per call)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    G = Generator().eval().to(memory_format=torch.channels_last, dtype=dtype)
    noise = torch.Generator().manual_seed(0)

    def step() -> None:
        z = torch.randn(batch, 100, generator=noise).to(dtype)
        y = one_hot(torch.randint(0, NUM_BUCKETS, (batch,), generator=noise)).to(dtype)
        with torch.inference_mode():
            G(z, y)

    return Work(label, batch, step, precision, count_flops(step))


@contextlib.contextmanager
def quiet_stderr():
    """Hide what C++ writes to fd 2: Kineto logs its start, stop and GPU probe there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(work: Work, top: int = 12) -> None:
    """Where one step's time goes: the ops with the most self CPU time."""
    work.step()  # warm: the profile shows the steady state
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        work.step()
        wall = time.perf_counter() - start
    events = sorted(profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    what = (
        "a one-step run (building the networks too)"
        if isinstance(work, TrainingWork)
        else "one step"
    )
    print(f"  {what} of {work.label}: {wall * 1e3:.0f} ms (profiled); top ops by self CPU time")
    print(f"    {'op':<46} {'self ms':>9} {'share':>6} {'calls':>6}")
    for e in events[:top]:
        share = e.self_cpu_time_total / total
        print(f"    {e.key[:46]:<46} {e.self_cpu_time_total / 1e3:9.1f} {share:6.1%} {e.count:6d}")


# ---- report ---------------------------------------------------------------------------------


def default_threads() -> int:
    """OMP_NUM_THREADS when set, else every CPU this process may run on."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else len(os.sched_getaffinity(0))


def print_rows(works: list[Work], peer: Work | None, ceiling: dict, auto: str, flops=None) -> None:
    """One row per workload: img/s, GFLOP/s and share of the ceiling, and the ratio to the peer.

    `flops` gives the peer a GFLOP/s figure: the recipe's arithmetic per step, which it does.
    """
    over_ceiling = False
    head = f"  {'':<38} {'img/s':>7} {'GFLOP/s':>8} {'of ceiling':>10}"
    print(head + ("  vs Keras peer" if peer else ""))
    if peer:
        achieved = peer.rate / peer.items * flops if flops else 0
        share = f"{achieved / ceiling['fp32']:10.0%}" if flops else f"{'':>10}"
        gflops = f"{achieved / 1e9:8.1f}" if flops else f"{'':>8}"
        print(f"  {peer.label:<38} {peer.rate:7.1f} {gflops} {share}  {1:12.2f}x")
    for work in works:
        label = work.label + (" (auto)" if work.shipped and work.precision == auto else "")
        row = f"  {label:<38} {work.rate:7.1f}"
        if work.flops:
            achieved = work.rate / work.items * work.flops
            share = achieved / ceiling[work.precision]
            row += f" {achieved / 1e9:8.1f} {share:10.0%}"
            over_ceiling = over_ceiling or share > 1
        else:
            row += f" {'':>8} {'':>10}"
        print((row + (f"  {ratio(work, peer):12.2f}x" if peer else "")).rstrip())
    if not peer:
        print("  vs Keras peer: not measured (peer not installed)")
    if over_ceiling:  # a share over 100% means the load changed between the two measurements
        print("  (over 100%: the machine was busier when the ceiling was measured; not quiet)")


def share_of_ceiling(work: Work, ceiling: dict) -> float:
    return work.rate / work.items * work.flops / ceiling[work.precision]


def judge_stage1(
    shipped: dict[str, Work], peer: Work | None, ceiling: dict, native: bool, auto: str
) -> list[Work]:
    """Issue 14's targets for stage 1; returns the workloads whose misses deserve a profile."""
    print("  targets (issue 14):")
    missed = []
    checks = [("fp32", TARGET_FP32, True), ("bf16", TARGET_BF16, native)]
    for precision, target, applies in checks:
        what = f"    {precision} at least {target} times the Keras peer"
        if not applies:
            print(f"{what}: not applicable (bf16 is emulated on this CPU; auto picks fp32)")
        elif peer is None:
            print(f"{what}: not judged (peer not installed)")
        else:
            value = ratio(shipped[precision], peer)
            met = value >= target
            print(f"{what}: {value:.2f}x, {'met' if met else 'MISSED'}")
            missed += [] if met else [shipped[precision]]
    share = share_of_ceiling(shipped[auto], ceiling)
    met = share >= TARGET_CEILING
    print(
        f"    {auto} (auto) at least {TARGET_CEILING:.0%} of the {auto} matmul ceiling: "
        f"{share:.0%}, {'met' if met else 'MISSED'}"
    )
    missed += [] if met else [shipped[auto]]
    return list({id(w): w for w in missed}.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per timing")
    parser.add_argument("--batch", type=int, default=128, help="training batch (the recipe's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="threads for torch and TensorFlow alike (default: OMP_NUM_THREADS, else all CPUs)",
    )
    parser.add_argument(
        "--sections", default="stage1,stage2,inference", help="comma-separated subset to run"
    )
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON, help="peer venv python")
    parser.add_argument("--profile", action="store_true", help="profile stage 1 even if met")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 round of 1 step at batch 32"
    )
    args = parser.parse_args()
    warm, ceiling_size = 2, 4096
    if args.quick:  # figures from this are for checking that the bench runs, nothing else
        args.repeats, args.steps, args.batch, warm, ceiling_size = 1, 1, 32, 1, 1024
    sections = set(args.sections.split(","))
    threads, batch = args.threads, args.batch
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(threads)

    native, why = native_bf16(CPU)
    auto, _ = resolve_precision("auto", CPU)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); native bf16: ", end="")
    print(f"{'yes' if native else 'no'} ({why}); precision auto picks: {auto}")
    print(
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}); threads {threads}:"
        f" torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}"
        f" (TensorFlow gets the same)"
    )
    print(
        f"{args.repeats} interleaved rounds of {args.steps} step(s) after {warm} warm-up; figures: "
        "medians; ratios: medians of per-round ratios"
        + ("; --quick: a smoke test, not a measurement" if args.quick else "")
    )
    ceiling = {
        "fp32": matmul_ceiling(torch.float32, ceiling_size, args.repeats),
        "bf16": matmul_ceiling(torch.bfloat16, ceiling_size, args.repeats),
    }
    for name, value in ceiling.items():
        print(f"ceiling: {name} matmul {ceiling_size}^3, {value / 1e9:.1f} GFLOP/s")
    print()

    peer = start_peer(args.peer_python, threads, batch)
    scratch_folder = tempfile.TemporaryDirectory(prefix="agecgan-bench-")
    scratch = Path(scratch_folder.name)  # synthetic data and run folders, removed at the end
    try:
        if "stage1" in sections:
            print(f"stage 1 (G and D, batch {batch})")
            works = [
                stage1_work("plain eager port, fp32", "fp32", True, batch, scratch / "plain"),
                stage1_work("shipped, fp32", "fp32", False, batch, scratch / "fp32"),
                stage1_work("shipped, bf16 autocast", "bf16", False, batch, scratch / "bf16"),
            ]
            peer_work = PeerWork(peer, "stage1", batch) if peer else None
            interleave(([peer_work] if peer else []) + works, args.steps, args.repeats, warm)
            recipe_flops = works[0].flops  # the plain port does the recipe's arithmetic
            print_rows(works, peer_work, ceiling, auto, recipe_flops)
            print(
                f"  (recipe arithmetic {recipe_flops / batch / 1e9:.2f} GFLOP per image; the "
                "shipped G computes each upsample + 5x5 conv as a 3x3 conv + pixel shuffle)"
            )
            shipped = {"fp32": works[1], "bf16": works[2]}
            missed = judge_stage1(shipped, peer_work, ceiling, native, auto)
            for work in missed or ([shipped[auto]] if args.profile else []):
                profile_step(work)
            del works, shipped, missed
            print()

        if "stage2" in sections:
            print(f"stage 2 (E on G's faces, batch {batch})")
            works = [stage2_work(p, p, batch, scratch / f"stage2-{p}") for p in ("fp32", "bf16")]
            peer_work = PeerWork(peer, "stage2", batch) if peer else None
            interleave(([peer_work] if peer else []) + works, args.steps, args.repeats, warm)
            print_rows(works, peer_work, ceiling, auto)
            del works
            print()

        if "inference" in sections:
            print("generator inference")
            for size in (1, 64):
                works = [inference_work(f"{p}, batch {size}", p, size) for p in ("fp32", "bf16")]
                peer_work = PeerWork(peer, f"infer{size}", size) if peer else None
                calls = max(args.steps * 8 // size, 4)  # enough calls to time at batch 1
                interleave(([peer_work] if peer else []) + works, calls, args.repeats, warm)
                print_rows(works, peer_work, ceiling, auto)
    finally:
        scratch_folder.cleanup()
        if peer:
            peer.close()


if __name__ == "__main__":
    sys.exit(main())
