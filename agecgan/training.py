"""Age-cGAN's training stages 1 (conditional GAN) and 2 (encoder), with what every run shares.

Each stage is one visible loop. Every run: resumable from an atomically saved state, TensorBoard
scalars, a fixed-noise sample grid (one row per age bucket, the same z in each column), a
progress bar with images/s, seeds, CUDA when present, optional bf16/fp16 autocast, the resolved
options as JSON in the run folder, and finished weights as safetensors plus config.json.
Under torchrun every process trains a slice of each batch with DistributedDataParallel.
"""

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from agecgan.ages import NUM_BUCKETS, one_hot
from agecgan.checkpoints import (
    NETWORK_FILES,
    export_model,
    load_network,
    load_training_state,
    save_training_state,
)
from agecgan.face_recognition import FaceRecognizer
from agecgan.losses import adversarial_loss, euclidean_loss
from agecgan.networks import AgeCGANConfig, Discriminator, Encoder, Generator
from agecgan.prepare import FaceDataset, to_model_range, to_uint8

STATE_NAME = "state.pt"
OPTIONS_NAME = "options.json"
SNAPSHOT_DIR = "snapshots"  # fp16 weight exports every snapshot_every steps
MODEL_DIR = "model"  # finished weights: <run>/model/{generator,discriminator,...}.safetensors


@dataclass
class RunOptions:
    """Options every stage shares."""

    run_dir: str = ""  # where state, samples, logs and weights go; default runs/<stage>-<time>
    resume: bool = False  # continue from run_dir/state.pt
    seed: int = 0  # seeds weights, data order and noise
    device: str = "auto"  # "auto": CUDA when present, else CPU
    precision: str = (
        "fp32"  # fp32 or bf16 autocast (fast on AMX/AVX-512-bf16 CPUs and Ampere+ GPUs)
    )
    channels_last: bool = True  # NHWC memory format: measured faster with oneDNN on CPU
    batch_size: int = 128  # per process; the recipe's batch
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps in total (0: run all epochs)
    save_every: int = 200  # steps between saved states: a killed run loses at most this many
    snapshot_every: int = 0  # steps between kept weight exports in snapshots/ (0: none)
    sample_every: int = 200  # steps between sample grids
    log_every: int = 10  # steps between TensorBoard scalars
    sample_columns: int = 8  # faces per row of the sample grid
    progress: bool = True  # progress bar on rank 0


@dataclass
class GanOptions(RunOptions):
    """Stage 1: train G and D as the recipe does."""

    data: str = "data/utkface"  # prepared dataset folder (python -m agecgan prepare)
    epochs: int = 500  # as the recipe; stop earlier with --max-steps
    lr_g: float = 2e-4  # Adam, as the DCGAN paper and the recipe
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    real_label: float = 0.9  # one-sided label smoothing on real faces, as the recipe
    fake_label: float = 0.0  # the recipe's fake labels (its zeros * 0.1 is 0)
    hflip: bool = False  # random horizontal flips of real faces (not in the recipe)
    # D also learns that real faces shown with a wrong age are fake: a matching-aware D (Reed et
    # al. 2016, GAN-CLS), which makes D judge the age and so pushes G to heed y (not in the recipe)
    mismatched_ages: bool = False
    keras_modes: bool = False  # literal Keras: fakes for D from G in eval mode, D frozen in eval
    config: dict = field(default_factory=lambda: AgeCGANConfig().to_dict())


@dataclass
class EncoderOptions(RunOptions):
    """Stage 2: train E on pairs (z, G(z, y)) with the Euclidean loss."""

    generator: str = ""  # model folder of a finished stage-1 run (its <run>/model)
    pairs: int = 100_000  # the paper's count of (z, y) pairs
    epochs: int = 10  # passes over the pairs
    lr: float = 1e-3  # Keras' default Adam, which the recipe's encoder uses
    beta1: float = 0.9
    beta2: float = 0.999
    data: str = ""  # optional prepared dataset: its test faces fill the sample grid


@dataclass
class IdentityOptions(RunOptions):
    """Stage 3 as the recipe trains it: fine-tune E so that FR sees x's person in G(E(x), y)."""

    model: str = ""  # model folder with encoder and generator (a stage-2 run's <run>/model)
    data: str = "data/utkface"  # prepared dataset folder: its train split
    fr_weights: str = ""  # face-recognition weights (default: the shipped dlib ResNet)
    batch_size: int = 32  # FR's forward and backward dominate the cost
    epochs: int = 1
    lr: float = 2e-4  # the recipe's Adam for this stage
    beta1: float = 0.5
    beta2: float = 0.999
    train_generator: bool = False  # also fine-tune G's weights (the recipe tunes E only)


# ---- shared machinery ---------------------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs: device, distributed rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def start_runtime(options: RunOptions) -> Runtime:
    """Join the torchrun process group when launched by torchrun; otherwise one process."""
    if "RANK" not in os.environ:
        return Runtime(select_device(options.device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(options.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Runtime(device, rank, world_size)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def autocast(runtime: Runtime, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    # bf16 keeps fp32's exponent range, so no loss scaling is needed (fp16 would need it).
    return torch.autocast(runtime.device.type, dtype=torch.bfloat16)


def prepare_network(network: nn.Module, runtime: Runtime, options: RunOptions) -> nn.Module:
    network = network.to(runtime.device)
    if options.channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def memory_format_of(options: RunOptions) -> torch.memory_format:
    return torch.channels_last if options.channels_last else torch.contiguous_format


def wrap_distributed(network: nn.Module, runtime: Runtime) -> nn.Module:
    if runtime.world_size == 1:
        return network
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def sync_buffers(network: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's batch-norm statistics (DDP syncs them only before a forward)."""
    if runtime.world_size > 1:
        for buffer in network.buffers():
            dist.broadcast(buffer, src=0)


def make_run_dir(options: RunOptions, stage: str, runtime: Runtime) -> Path:
    if not options.run_dir:
        name = [str(Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")]
        if runtime.world_size > 1:
            dist.broadcast_object_list(name, src=0)  # the ranks' clocks may straddle a second
        options.run_dir = name[0]
    run_dir = Path(options.run_dir)
    if options.resume and not (run_dir / STATE_NAME).exists():
        raise FileNotFoundError(f"--resume: no {STATE_NAME} in {run_dir}")
    return run_dir


def write_options(run_dir: Path, stage: str, options: RunOptions, runtime: Runtime) -> None:
    resolved = {
        "stage": stage,
        **dataclasses.asdict(options),
        "resolved_device": str(runtime.device),
        "world_size": runtime.world_size,
        "torch": torch.__version__,
    }
    tmp = run_dir / (OPTIONS_NAME + ".tmp")
    tmp.write_text(json.dumps(resolved, indent=2) + "\n")
    os.replace(tmp, run_dir / OPTIONS_NAME)


def epoch_batches(
    num_items: int, batch_size: int, epoch: int, seed: int, runtime: Runtime
) -> list[torch.Tensor]:
    """This process's batches of item indices for one epoch: a seeded shuffle, split by rank.

    Every process draws the same permutation, so the ranks' slices never overlap; incomplete
    batches are dropped, as the recipe does (batch norm needs full batches).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    global_batch = batch_size * runtime.world_size
    batches = []
    for start in range(0, num_items - global_batch + 1, global_batch):
        chunk = order[start : start + global_batch]
        batches.append(chunk[runtime.rank * batch_size : (runtime.rank + 1) * batch_size])
    return batches


def total_steps_of(options: RunOptions, steps_per_epoch: int) -> int:
    total = options.epochs * steps_per_epoch
    return min(total, options.max_steps) if options.max_steps else total


def progress_bar(stage: str, step: int, total: int, options: RunOptions, runtime: Runtime) -> tqdm:
    enabled = options.progress and runtime.is_main
    return tqdm(total=total, initial=step, unit="step", desc=stage, disable=not enabled)


def save_grid(rows: list[torch.Tensor], path: Path) -> np.ndarray:
    """Save faces as a grid: each row a (C, 3, H, W) batch in [-1, 1]. Returns the uint8 image."""
    grid = torch.cat([torch.cat(list(to_uint8(row.cpu())), dim=1) for row in rows], dim=0)
    array = grid.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)
    return array


class Logger:
    """TensorBoard scalars and images, on rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, step: int, **values: float) -> None:
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def image(self, step: int, name: str, array: np.ndarray) -> None:
        if self.writer:
            self.writer.add_image(name, array, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def seeded_noise(seed: int, rank: int) -> torch.Generator:
    """Per-process noise source (CPU): different per rank, saved in the state for resuming."""
    return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (rank + 1))


def random_ages(count: int, generator: torch.Generator) -> torch.Tensor:
    return one_hot(torch.randint(0, NUM_BUCKETS, (count,), generator=generator))


def fixed_sample_noise(config: AgeCGANConfig, columns: int, seed: int) -> torch.Tensor:
    """The same z for every grid of a run: one per column."""
    return torch.randn(columns, config.z_dim, generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def age_rows(G: nn.Module, z: torch.Tensor) -> list[torch.Tensor]:
    """G(z, y) for each age bucket y: one row per bucket, youngest first."""
    was_training = G.training
    G.eval()
    rows = [G(z, one_hot(torch.full((len(z),), b)).to(z.device)) for b in range(NUM_BUCKETS)]
    G.train(was_training)
    return [row.float() for row in rows]


def begin_run(options: RunOptions, stage: str) -> tuple[Runtime, Path]:
    """Start the process group (under torchrun), make the run folder, seed, write the options."""
    runtime = start_runtime(options)
    run_dir = make_run_dir(options, stage, runtime)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)  # identical initial weights on every rank
    if runtime.is_main:
        write_options(run_dir, stage, options, runtime)
    return runtime, run_dir


def run_steps(
    stage: str,
    options: RunOptions,
    runtime: Runtime,
    run_dir: Path,
    *,
    num_items: int,
    step: int,
    train_step: Callable[[torch.Tensor], dict[str, float]],
    sample_rows: Callable[[], list[torch.Tensor]],
    state: Callable[[], dict],
    snapshot: Callable[[Path], None] | None = None,
) -> int:
    """The loop every stage shares; returns the final step.

    Each step, train_step gets this process's item indices and returns its losses; every
    log_every steps they go to TensorBoard with images/s, every sample_every steps
    sample_rows() becomes a grid, every save_every steps state() (called on every rank, so it
    may gather) is saved atomically with the step, and every snapshot_every steps snapshot()
    exports the weights to snapshots/step-NNNNNNN, so that a step can be chosen by evaluation
    later. A resumed run skips the batches of the current epoch that it already trained on.
    """
    global_batch = options.batch_size * runtime.world_size
    steps_per_epoch = num_items // global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"{num_items} training items cannot fill one batch of {options.batch_size} x "
            f"{runtime.world_size} processes"
        )
    total = total_steps_of(options, steps_per_epoch)
    logger = Logger(run_dir, runtime.is_main)
    bar = progress_bar(stage, step, total, options, runtime)
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for indices in epoch_batches(num_items, options.batch_size, epoch, options.seed, runtime)[
            skip:
        ]:
            if step >= total:
                break
            started = time.perf_counter()
            losses = train_step(indices)
            step += 1
            speed = global_batch / (time.perf_counter() - started)
            bar.update(1)
            bar.set_postfix(
                {name.split("/")[-1]: f"{value:.3f}" for name, value in losses.items()}
                | {"img_s": f"{speed:.0f}"}
            )
            if step % options.log_every == 0:
                logger.scalars(step, **losses, **{"speed/images_per_s": speed, "epoch": epoch})
            if runtime.is_main and (step % options.sample_every == 0 or step == total):
                grid = save_grid(sample_rows(), run_dir / "samples" / f"{step:07d}.png")
                logger.image(step, "samples", grid)
            if step % options.save_every == 0 or step == total:
                contents = state()
                if runtime.is_main:
                    contents |= {"step": step, "options": json.dumps(dataclasses.asdict(options))}
                    save_training_state(run_dir / STATE_NAME, contents)
            every = options.snapshot_every
            if snapshot and every and step % every == 0 and runtime.is_main:
                snapshot(run_dir / SNAPSHOT_DIR / f"step-{step:07d}")
    bar.close()
    logger.close()
    return step


# ---- stage 1: conditional GAN ---------------------------------------------------------------


@dataclass
class TrainResult:
    """Where the finished weights went, and the trained networks of this process."""

    model_dir: Path
    networks: dict[str, nn.Module]


def train_gan(options: GanOptions) -> TrainResult:
    """Train G and D; returns the folder of the finished weights and the networks."""
    runtime, run_dir = begin_run(options, "gan")
    config = AgeCGANConfig.from_dict(options.config)
    G = prepare_network(Generator(config), runtime, options)
    D = prepare_network(Discriminator(config), runtime, options)
    betas = (options.beta1, options.beta2)
    optimizer_g = torch.optim.Adam(G.parameters(), options.lr_g, betas=betas)
    optimizer_d = torch.optim.Adam(D.parameters(), options.lr_d, betas=betas)
    noise = seeded_noise(options.seed, runtime.rank)
    step = 0
    if options.resume:
        state = load_training_state(run_dir / STATE_NAME, runtime.device)
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        optimizer_d.load_state_dict(state["optimizer_d"])
        restore_random_states(state["random"], noise, runtime)
        step = state["step"]
    G_ddp, D_ddp = wrap_distributed(G, runtime), wrap_distributed(D, runtime)
    dataset = FaceDataset.load(options.data, split="train")
    sample_z = fixed_sample_noise(config, options.sample_columns, options.seed).to(runtime.device)
    memory_format = memory_format_of(options)

    def train_step(indices: torch.Tensor) -> dict[str, float]:
        x = to_model_range(dataset.images[indices]).to(runtime.device)  # (B, 3, 64, 64)
        if options.hflip:
            flip = torch.rand(len(x), generator=noise) < 0.5
            x[flip] = x[flip].flip(3)
        x = x.contiguous(memory_format=memory_format)
        y = one_hot(dataset.buckets[indices]).to(runtime.device)  # (B, 6) true ages
        d_losses, g_loss = gan_step(
            G, D, G_ddp, D_ddp, optimizer_g, optimizer_d, x, y, noise, options, runtime
        )
        losses = {"loss/d_real": d_losses[0], "loss/d_fake": d_losses[1], "loss/g": g_loss}
        if options.mismatched_ages:
            losses["loss/d_mismatch"] = d_losses[2]  # real faces with a wrong age
        return losses

    def state() -> dict:
        return {
            "generator": G.state_dict(),
            "discriminator": D.state_dict(),
            "optimizer_g": optimizer_g.state_dict(),
            "optimizer_d": optimizer_d.state_dict(),
            "random": gather_random_states(noise, runtime),
        }

    run_steps(
        "gan",
        options,
        runtime,
        run_dir,
        num_items=len(dataset),
        step=step,
        train_step=train_step,
        sample_rows=lambda: age_rows(G, sample_z),
        state=state,
        snapshot=lambda folder: export_model(
            folder, config, torch.float16, generator=G, discriminator=D
        ),
    )
    sync_buffers(G, runtime)
    sync_buffers(D, runtime)
    model_dir = run_dir / MODEL_DIR
    if runtime.is_main:
        export_model(model_dir, config, generator=G, discriminator=D)
    stop_runtime(runtime)
    return TrainResult(model_dir, {"generator": G, "discriminator": D})


def gan_step(
    G: nn.Module,
    D: nn.Module,
    G_ddp: nn.Module,
    D_ddp: nn.Module,
    optimizer_g: torch.optim.Optimizer,
    optimizer_d: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    noise: torch.Generator,
    options: GanOptions,
    runtime: Runtime,
) -> tuple[list[float], float]:
    """One stage-1 iteration of the recipe on real faces x with ages y; returns the losses.

    G_ddp and D_ddp are G and D, or their DistributedDataParallel wrappers under torchrun.
    """
    B, device = len(x), runtime.device
    memory_format = memory_format_of(options)
    z = torch.randn(B, G.config.z_dim, generator=noise).to(device)

    # D learns real faces of their true ages against G's faces for the same ages. Both networks
    # stay in training mode (batch statistics, dropout) in both halves of the step. Keras' G.predict
    # and frozen D would use running statistics instead (--keras-modes): measured here, D then
    # judges faces that G's training never sees, G's loss falls to 0 while D wins, and no face
    # forms in 200 steps (README, "Training").
    G.train(not options.keras_modes)
    with torch.no_grad(), autocast(runtime, options.precision):
        fake = G(z, y).float().contiguous(memory_format=memory_format)
    D_ddp.train()
    d_losses = []
    mismatch = None
    for faces, target in ((x, options.real_label), (fake, options.fake_label)):
        with autocast(runtime, options.precision):
            if options.mismatched_ages and faces is x:
                # The same real faces twice in one forward, with their ages and with another
                # bucket's (as fakes): one batch, so batch norm sees the recipe's real batch.
                shift = torch.randint(1, NUM_BUCKETS, (B,), generator=noise).to(device)
                wrong = one_hot((y.argmax(1) + shift) % NUM_BUCKETS).to(device)
                logits = D_ddp(torch.cat([x, x]), torch.cat([y, wrong]))
                d_loss = adversarial_loss(logits[:B], target)
                mismatch = adversarial_loss(logits[B:], options.fake_label)
                step_loss = d_loss + mismatch
            else:
                d_loss = step_loss = adversarial_loss(D_ddp(faces, y), target)
        optimizer_d.zero_grad(set_to_none=True)
        step_loss.backward()
        optimizer_d.step()  # one update per batch, as the recipe's two train_on_batch calls
        d_losses.append(d_loss.item())
    if mismatch is not None:
        d_losses.append(mismatch.item())

    # G learns to fool the frozen D on fresh z and random ages: D gets no weight gradients and
    # no DDP sync here.
    G_ddp.train()
    D.train(not options.keras_modes)
    D.requires_grad_(False)
    z = torch.randn(B, G.config.z_dim, generator=noise).to(device)
    y_random = random_ages(B, noise).to(device)
    with autocast(runtime, options.precision):
        g_loss = adversarial_loss(D(G_ddp(z, y_random), y_random), 1.0)
    optimizer_g.zero_grad(set_to_none=True)
    g_loss.backward()
    optimizer_g.step()
    D.requires_grad_(True)
    return d_losses, g_loss.item()


def encoder_step(
    E: nn.Module,
    G: nn.Module,
    optimizer: torch.optim.Optimizer,
    z: torch.Tensor,
    y: torch.Tensor,
    options: EncoderOptions,
    runtime: Runtime,
) -> float:
    """One stage-2 iteration: E learns to recover z from G(z, y) (G frozen); returns the loss."""
    memory_format = memory_format_of(options)
    with torch.no_grad(), autocast(runtime, options.precision):
        x = G(z, y).float().contiguous(memory_format=memory_format)  # (B, 3, 64, 64)
    E.train()
    with autocast(runtime, options.precision):
        loss = euclidean_loss(E(x), z)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def gather_random_states(noise: torch.Generator, runtime: Runtime) -> list[dict]:
    """Every rank's noise and global RNG (dropout) states: a resumed run draws the same numbers."""
    state = {"noise": noise.get_state(), "torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    if runtime.world_size == 1:
        return [state]
    states: list = [None] * runtime.world_size
    dist.all_gather_object(states, state)
    return states


def restore_random_states(states: list[dict], noise: torch.Generator, runtime: Runtime) -> None:
    if len(states) != runtime.world_size:
        raise ValueError(
            f"the saved state is from {len(states)} processes, this run has "
            f"{runtime.world_size}: resume with the same process count"
        )
    state = states[runtime.rank]
    noise.set_state(state["noise"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), runtime.device)


# ---- stage 2: encoder -----------------------------------------------------------------------


def train_encoder(options: EncoderOptions) -> TrainResult:
    """Train E to invert a frozen G; returns the model folder (E plus the G and D used)."""
    if not options.generator:
        raise ValueError("stage 2 needs --generator: the model folder of a stage-1 run")
    runtime, run_dir = begin_run(options, "encoder")
    G = prepare_network(load_network(options.generator, "generator"), runtime, options)
    G.requires_grad_(False)
    G.eval()  # frozen: running statistics, no dropout
    config = G.config
    E = prepare_network(Encoder(config), runtime, options)
    optimizer = torch.optim.Adam(E.parameters(), options.lr, betas=(options.beta1, options.beta2))
    step = 0
    if options.resume:
        state = load_training_state(run_dir / STATE_NAME, runtime.device)
        E.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    E_ddp = wrap_distributed(E, runtime)

    # The (z, y) pairs are drawn once from the seed, so every epoch and every resume sees the
    # same set; G's faces are made batch by batch (storing 100,000 faces would take 5 GB).
    pair_source = torch.Generator().manual_seed(options.seed + 2)
    all_z = torch.randn(options.pairs, config.z_dim, generator=pair_source)
    all_y = random_ages(options.pairs, pair_source)
    grid_inputs = encoder_grid_inputs(options, G, config, runtime.device)

    def train_step(indices: torch.Tensor) -> dict[str, float]:
        z, y = all_z[indices].to(runtime.device), all_y[indices].to(runtime.device)
        return {"loss/euclidean": encoder_step(E_ddp, G, optimizer, z, y, options, runtime)}

    def state() -> dict:
        return {"encoder": E.state_dict(), "optimizer": optimizer.state_dict()}

    run_steps(
        "encoder",
        options,
        runtime,
        run_dir,
        num_items=options.pairs,
        step=step,
        train_step=train_step,
        sample_rows=lambda: reconstruction_rows(E, G, grid_inputs),
        state=state,
    )
    sync_buffers(E, runtime)
    model_dir = run_dir / MODEL_DIR
    if runtime.is_main:
        export_encoder_model(model_dir, options.generator, E, G)
    stop_runtime(runtime)
    return TrainResult(model_dir, {"encoder": E})


def export_encoder_model(model_dir: Path, source: str, E: nn.Module, G: nn.Module) -> None:
    """A complete model folder: E, G, and the source folder's D when it has one (so that
    users can go on training)."""
    networks = {"encoder": E, "generator": G}
    if (Path(source) / NETWORK_FILES["discriminator"]).exists():
        networks["discriminator"] = load_network(source, "discriminator")
    export_model(model_dir, G.config, **networks)


def encoder_grid_inputs(
    options: EncoderOptions, G: nn.Module, config: AgeCGANConfig, device: torch.device
) -> torch.Tensor:
    """Faces the encoder grid shows: real test faces when --data is given, else G's own."""
    columns = options.sample_columns
    if options.data:
        test = FaceDataset.load(options.data, split="test")
        return to_model_range(test.images[:columns]).to(device)
    z = fixed_sample_noise(config, columns, options.seed).to(device)
    ages = one_hot(torch.arange(columns) % NUM_BUCKETS).to(device)
    with torch.no_grad():
        return G(z, ages).float()


@torch.no_grad()
def reconstruction_rows(E: nn.Module, G: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """First row the inputs x, then G(E(x), y) for each age bucket: the aging grid."""
    was_training = E.training
    E.eval()
    z = E(x).float()
    E.train(was_training)
    return [x.float(), *age_rows(G, z)]


# ---- stage 3 (the recipe's form): identity-preserving fine-tuning ---------------------------


def train_identity(options: IdentityOptions) -> TrainResult:
    """Fine-tune E (and G with --train-generator) with the FR loss; returns a new model folder.

    The loss is the recipe's: the mean Euclidean distance between FR(x) and
    FR(G(E(x), y_x)) over real training faces x with their true ages y_x. The input model folder
    is never written to: the improved weights go to <run>/model, beside the originals.
    """
    if not options.model:
        raise ValueError("stage 3 needs --model: the model folder of a stage-2 run")
    runtime, run_dir = begin_run(options, "identity")
    E = prepare_network(load_network(options.model, "encoder"), runtime, options)
    G = prepare_network(load_network(options.model, "generator"), runtime, options)
    G.eval()  # running statistics, no dropout, even when its weights are tuned
    G.requires_grad_(options.train_generator)
    FR = FaceRecognizer.from_pretrained(options.fr_weights or None).to(runtime.device)
    trained = {"encoder": E} | ({"generator": G} if options.train_generator else {})
    parameters = [p for network in trained.values() for p in network.parameters()]
    optimizer = torch.optim.Adam(parameters, options.lr, betas=(options.beta1, options.beta2))
    step = 0
    if options.resume:
        state = load_training_state(run_dir / STATE_NAME, runtime.device)
        for name, network in trained.items():
            network.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    E_ddp = wrap_distributed(E, runtime)
    G_ddp = wrap_distributed(G, runtime) if options.train_generator else G
    dataset = FaceDataset.load(options.data, split="train")
    test = FaceDataset.load(options.data, split="test")
    grid_inputs = to_model_range(test.images[: options.sample_columns]).to(runtime.device)
    memory_format = memory_format_of(options)

    def train_step(indices: torch.Tensor) -> dict[str, float]:
        x = to_model_range(dataset.images[indices]).to(runtime.device)
        x = x.contiguous(memory_format=memory_format)  # (B, 3, 64, 64)
        y = one_hot(dataset.buckets[indices]).to(runtime.device)
        with torch.no_grad():
            target = FR(x)  # (B, 128)
        E_ddp.train()
        with autocast(runtime, options.precision):
            reconstruction = G_ddp(E_ddp(x), y)
        loss = euclidean_loss(FR(reconstruction.float()), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss/identity": loss.item()}

    def state() -> dict:
        return {name: network.state_dict() for name, network in trained.items()} | {
            "optimizer": optimizer.state_dict()
        }

    run_steps(
        "identity",
        options,
        runtime,
        run_dir,
        num_items=len(dataset),
        step=step,
        train_step=train_step,
        sample_rows=lambda: reconstruction_rows(E, G, grid_inputs),
        state=state,
    )
    sync_buffers(E, runtime)
    model_dir = run_dir / MODEL_DIR
    if runtime.is_main:
        export_encoder_model(model_dir, options.model, E, G)
    stop_runtime(runtime)
    return TrainResult(model_dir, trained)
