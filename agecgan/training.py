"""Age-cGAN's training stages: 1 (conditional GAN), 2 (encoder) and 3 (identity fine-tuning).

Each stage is one function whose loop shows a whole training step; `agecgan.runs.Run` keeps the
rest (folder, resume, batches, logs, sample grids, snapshots, atomic state saves) and
`agecgan.runtime` the device, precision and torchrun process group. Every option is a field
with its help text: `python train.py <stage> --help` lists them.
"""

import copy
import dataclasses
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from agecgan.ages import NUM_BUCKETS, one_hot
from agecgan.checkpoints import NETWORK_FILES, export_model, load_network
from agecgan.face_recognition import FaceRecognizer
from agecgan.losses import adversarial_loss, euclidean_loss
from agecgan.networks import AgeCGANConfig, Discriminator, Encoder, Generator, to_model_range
from agecgan.prepare import FaceDataset
from agecgan.runs import Run, RunOptions, default_run_dir, option


@dataclass
class GanOptions(RunOptions):
    """Stage 1: train G and D as the recipe does."""

    data: str = option("data/utkface", "prepared dataset folder (python -m agecgan prepare)")
    epochs: int = option(500, "as the recipe; stop earlier with --max-steps")
    lr_g: float = option(2e-4, "G's Adam learning rate, as the DCGAN paper and the recipe")
    lr_d: float = option(2e-4, "D's Adam learning rate, as the DCGAN paper and the recipe")
    beta1: float = option(0.5, "Adam's beta1, as the recipe")
    beta2: float = option(0.999, "Adam's beta2, as the recipe")
    real_label: float = option(0.9, "one-sided label smoothing on real faces, as the recipe")
    fake_label: float = option(0.0, "the recipe's fake labels (its zeros * 0.1 is 0)")
    hflip: bool = option(False, "random horizontal flips of real faces (not in the recipe)")
    # D also learns that real faces shown with a wrong age are fake: a matching-aware D (Reed et
    # al. 2016, GAN-CLS), which makes D judge the age and so pushes G to heed y (not in the recipe)
    mismatched_ages: bool = option(False, "matching-aware D: real faces with a wrong age as fakes")
    keras_modes: bool = option(
        False, "literal Keras: fakes for D from G in eval mode, D frozen in eval mode"
    )
    # A running average of G's weights draws steadier faces than G at any one step, where D and
    # G chase each other (Karras et al. 2018; Yazici et al. 2019). Not in the recipe.
    ema_decay: float = option(0.0, "keep an average of G's weights, ship and sample it (0: none)")
    config: dict = option(AgeCGANConfig().to_dict(), "the architecture (the recipe's)")

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("batch_size", "seed", "data", "config")


@dataclass
class EncoderOptions(RunOptions):
    """Stage 2: train E on pairs (z, G(z, y)) with the Euclidean loss."""

    generator: str = option("", "model folder of a finished stage-1 run (its <run>/model)")
    pairs: int = option(100_000, "the paper's count of (z, y) pairs")
    epochs: int = option(10, "passes over the pairs")
    lr: float = option(1e-3, "Keras' default Adam, which the recipe's encoder uses")
    beta1: float = option(0.9, "Adam's beta1 (Keras' default)")
    beta2: float = option(0.999, "Adam's beta2 (Keras' default)")
    data: str = option("", "optional prepared dataset: its test faces fill the sample grid")

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("batch_size", "seed", "generator", "pairs")


@dataclass
class IdentityOptions(RunOptions):
    """Stage 3 as the recipe trains it: fine-tune E so that FR sees x's person in G(E(x), y)."""

    model: str = option("", "model folder with encoder and generator (a stage-2 run's <run>/model)")
    data: str = option("data/utkface", "prepared dataset folder: its train split")
    fr_weights: str = option("", "face-recognition weights (default: the shipped dlib ResNet)")
    batch_size: int = option(32, "FR's forward and backward dominate the cost")
    epochs: int = option(1, "passes over the training faces")
    lr: float = option(2e-4, "the recipe's Adam for this stage")
    beta1: float = option(0.5, "Adam's beta1, as the recipe")
    beta2: float = option(0.999, "Adam's beta2, as the recipe")
    train_generator: bool = option(False, "also fine-tune G's weights (the recipe tunes E only)")

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("batch_size", "seed", "model", "data")


@dataclass
class TrainResult:
    """Where the finished weights went, and the trained networks of this process."""

    model_dir: Path
    networks: dict[str, nn.Module]
    speeds: list[float]  # images/s of each step trained (all processes together)


def random_ages(count: int, generator: torch.Generator) -> torch.Tensor:
    return one_hot(torch.randint(0, NUM_BUCKETS, (count,), generator=generator))


def fixed_sample_noise(config: AgeCGANConfig, columns: int, seed: int) -> torch.Tensor:
    """The same z for every grid of a run: one per column."""
    return torch.randn(columns, config.z_dim, generator=torch.Generator().manual_seed(seed + 1))


@torch.no_grad()
def update_average(average: nn.Module, network: nn.Module, decay: float) -> None:
    """Move the averaged weights towards the network's; batch-norm statistics are copied."""
    for kept, current in zip(average.parameters(), network.parameters(), strict=True):
        kept.lerp_(current, 1.0 - decay)
    for kept, current in zip(average.buffers(), network.buffers(), strict=True):
        kept.copy_(current)


@torch.no_grad()
def age_rows(G: nn.Module, z: torch.Tensor) -> list[torch.Tensor]:
    """G(z, y) for each age bucket y: one row per bucket, youngest first."""
    was_training = G.training
    G.eval()
    rows = [G(z, one_hot(torch.full((len(z),), b)).to(z.device)) for b in range(NUM_BUCKETS)]
    G.train(was_training)
    return [row.float() for row in rows]


@torch.no_grad()
def reconstruction_rows(E: nn.Module, G: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """First row the inputs x, then G(E(x), y) for each age bucket: the aging grid."""
    was_training = E.training
    E.eval()
    z = E(x).float()
    E.train(was_training)
    return [x.float(), *age_rows(G, z)]


# ---- stage 1: conditional GAN ---------------------------------------------------------------


def train_gan(options: GanOptions) -> TrainResult:
    """Train G and D; returns the folder of the finished weights and the networks."""
    run = Run(options, "gan")
    dataset = FaceDataset.load(options.data, split="train")
    # G learns faces cut with the data's framing, and its model folder says so.
    framing = (dataset.framing.scale, dataset.framing.eye_height)
    config = replace(AgeCGANConfig.from_dict(options.config), framing=framing)
    G, D = run.place(Generator(config)), run.place(Discriminator(config))
    betas = (options.beta1, options.beta2)
    optimizer_g = torch.optim.Adam(G.parameters(), options.lr_g, betas=betas)
    optimizer_d = torch.optim.Adam(D.parameters(), options.lr_d, betas=betas)
    if state := run.resume():
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        optimizer_g.load_state_dict(state["optimizer_g"])
        optimizer_d.load_state_dict(state["optimizer_d"])
    # The average is what ships; a run that turns it on when resumed starts it from G.
    G_average = copy.deepcopy(G).requires_grad_(False) if options.ema_decay else None
    if state and G_average is not None:
        G_average.load_state_dict(state.get("generator_average", state["generator"]))
    G_kept = G if G_average is None else G_average
    G_ddp, D_ddp = run.distributed(G), run.distributed(D)
    sample_z = fixed_sample_noise(config, options.sample_columns, options.seed).to(run.device)
    noise = run.noise
    images = dataset.images.to(run.device)  # on a GPU the faces (290 MB) are indexed there

    for indices in run.batches(len(dataset)):
        x = to_model_range(images[indices.to(images.device)])  # (B, 3, 64, 64) real faces
        if options.hflip:
            flip = torch.rand(len(x), generator=noise) < 0.5
            x[flip] = x[flip].flip(3)
        x = run.faces(x)
        y = one_hot(dataset.buckets[indices]).to(run.device)  # (B, 6) their true ages
        B = len(x)

        # D learns real faces of their true ages against G's faces for the same ages. Both
        # networks stay in training mode (batch statistics, dropout) in both halves of the
        # step. Keras' G.predict and frozen D would use running statistics instead
        # (--keras-modes): measured here, D then judges faces that G's training never sees,
        # G's loss falls to 0 while D wins, and no face forms in 200 steps (README, "Training").
        z = torch.randn(B, config.z_dim, generator=noise).to(run.device)
        G.train(not options.keras_modes)
        with torch.no_grad(), run.autocast():
            fake = run.faces(G(z, y).float())
        D_ddp.train()
        with run.autocast():
            if options.mismatched_ages:
                # The same real faces twice in one forward, with their ages and with another
                # bucket's (as fakes): one batch, so batch norm sees the recipe's real batch.
                shift = torch.randint(1, NUM_BUCKETS, (B,), generator=noise).to(run.device)
                wrong = one_hot((y.argmax(1) + shift) % NUM_BUCKETS).to(run.device)
                logits = D_ddp(torch.cat([x, x]), torch.cat([y, wrong]))
                d_real = adversarial_loss(logits[:B], options.real_label)
                d_mismatch = adversarial_loss(logits[B:], options.fake_label)
            else:
                d_real = adversarial_loss(D_ddp(x, y), options.real_label)
                d_mismatch = torch.zeros((), device=run.device)
        optimizer_d.zero_grad(set_to_none=True)
        (d_real + d_mismatch).backward()
        optimizer_d.step()  # one update per batch, as the recipe's two train_on_batch calls
        with run.autocast():
            d_fake = adversarial_loss(D_ddp(fake, y), options.fake_label)
        optimizer_d.zero_grad(set_to_none=True)
        d_fake.backward()
        optimizer_d.step()

        # G learns to fool the frozen D on fresh z and random ages: D gets no weight gradients
        # and no DDP sync here.
        G_ddp.train()
        D.train(not options.keras_modes)
        D.requires_grad_(False)
        z = torch.randn(B, config.z_dim, generator=noise).to(run.device)
        y_random = random_ages(B, noise).to(run.device)
        with run.autocast():
            g_loss = adversarial_loss(D(G_ddp(z, y_random), y_random), 1.0)
        optimizer_g.zero_grad(set_to_none=True)
        g_loss.backward()
        optimizer_g.step()
        D.requires_grad_(True)
        if G_average is not None:
            update_average(G_average, G, options.ema_decay)

        losses = {
            "loss/d_real": d_real.item(),
            "loss/d_fake": d_fake.item(),
            "loss/g": g_loss.item(),
        }
        if options.mismatched_ages:
            losses["loss/d_mismatch"] = d_mismatch.item()  # real faces with a wrong age
        run.log(losses)
        if run.due(options.sample_every):
            run.save_grid(age_rows(G_kept, sample_z))
        if run.due(options.save_every):
            average = {} if G_average is None else {"generator_average": G_average.state_dict()}
            run.save_state(
                {
                    "generator": G.state_dict(),
                    "discriminator": D.state_dict(),
                    "optimizer_g": optimizer_g.state_dict(),
                    "optimizer_d": optimizer_d.state_dict(),
                }
                | average
            )
        if run.due(options.snapshot_every, at_end=False):
            run.snapshot(config, generator=G_kept, discriminator=D)

    model_dir = run.finish(
        lambda folder: export_model(folder, config, generator=G_kept, discriminator=D),
        generator=G_kept,
        discriminator=D,
    )
    return TrainResult(model_dir, {"generator": G_kept, "discriminator": D}, run.speeds)


# ---- stage 2: encoder -----------------------------------------------------------------------


def train_encoder(options: EncoderOptions) -> TrainResult:
    """Train E to invert a frozen G; returns the model folder (E plus the G and D used)."""
    if not options.generator:
        raise ValueError("stage 2 needs --generator: the model folder of a stage-1 run")
    run = Run(options, "encoder")
    G = run.place(load_network(options.generator, "generator"))
    G.requires_grad_(False)
    G.eval()  # frozen: running statistics, no dropout
    config = G.config
    E = run.place(Encoder(config))
    optimizer = torch.optim.Adam(E.parameters(), options.lr, betas=(options.beta1, options.beta2))
    if state := run.resume():
        E.load_state_dict(state["encoder"])
        optimizer.load_state_dict(state["optimizer"])
    E_ddp = run.distributed(E)

    # The (z, y) pairs are drawn once from the seed, so every epoch and every resume sees the
    # same set; G's faces are made batch by batch (storing 100,000 faces would take 5 GB).
    pair_source = torch.Generator().manual_seed(options.seed + 2)
    all_z = torch.randn(options.pairs, config.z_dim, generator=pair_source)
    all_y = random_ages(options.pairs, pair_source)
    grid_inputs = encoder_grid_inputs(options, G, config, run.device)

    for indices in run.batches(options.pairs):
        z, y = all_z[indices].to(run.device), all_y[indices].to(run.device)
        with torch.no_grad(), run.autocast():
            x = run.faces(G(z, y).float())  # (B, 3, 64, 64)
        E_ddp.train()
        with run.autocast():
            loss = euclidean_loss(E_ddp(x), z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        run.log({"loss/euclidean": loss.item()})
        if run.due(options.sample_every):
            run.save_grid(reconstruction_rows(E, G, grid_inputs))
        if run.due(options.save_every):
            run.save_state({"encoder": E.state_dict(), "optimizer": optimizer.state_dict()})

    model_dir = run.finish(
        lambda folder: export_encoder_model(folder, options.generator, E, G), encoder=E
    )
    return TrainResult(model_dir, {"encoder": E}, run.speeds)


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


# ---- stage 3 (the recipe's form): identity-preserving fine-tuning ---------------------------


def train_identity(options: IdentityOptions) -> TrainResult:
    """Fine-tune E (and G with --train-generator) with the FR loss; returns a new model folder.

    The loss is the recipe's: the mean Euclidean distance between FR(x) and
    FR(G(E(x), y_x)) over real training faces x with their true ages y_x. The input model folder
    is never written to: the improved weights go to <run>/model, beside the originals.
    """
    if not options.model:
        raise ValueError("stage 3 needs --model: the model folder of a stage-2 run")
    run = Run(options, "identity")
    E = run.place(load_network(options.model, "encoder"))
    G = run.place(load_network(options.model, "generator"))
    G.eval()  # running statistics, no dropout, even when its weights are tuned
    G.requires_grad_(options.train_generator)
    FR = FaceRecognizer.from_pretrained(options.fr_weights or None).to(run.device)
    trained = {"encoder": E} | ({"generator": G} if options.train_generator else {})
    parameters = [p for network in trained.values() for p in network.parameters()]
    optimizer = torch.optim.Adam(parameters, options.lr, betas=(options.beta1, options.beta2))
    if state := run.resume():
        for name, network in trained.items():
            network.load_state_dict(state[name])
        optimizer.load_state_dict(state["optimizer"])
    E_ddp = run.distributed(E)
    G_ddp = run.distributed(G) if options.train_generator else G
    dataset = FaceDataset.load(options.data, split="train")
    test = FaceDataset.load(options.data, split="test")
    grid_inputs = to_model_range(test.images[: options.sample_columns]).to(run.device)

    for indices in run.batches(len(dataset)):
        x = run.faces(to_model_range(dataset.images[indices]))  # (B, 3, 64, 64)
        y = one_hot(dataset.buckets[indices]).to(run.device)
        with torch.no_grad():
            target = FR(x)  # (B, 128)
        E_ddp.train()
        with run.autocast():
            reconstruction = G_ddp(E_ddp(x), y)
        loss = euclidean_loss(FR(reconstruction.float()), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        run.log({"loss/identity": loss.item()})
        if run.due(options.sample_every):
            run.save_grid(reconstruction_rows(E, G, grid_inputs))
        if run.due(options.save_every):
            run.save_state(
                {name: network.state_dict() for name, network in trained.items()}
                | {"optimizer": optimizer.state_dict()}
            )

    model_dir = run.finish(
        lambda folder: export_encoder_model(folder, options.model, E, G), **trained
    )
    return TrainResult(model_dir, trained, run.speeds)


# ---- all stages, one command (a GPU reproduces the default model in minutes) ----------------


@dataclass
class AllOptions(GanOptions):
    """Stage 1 for --epochs, stage 2 on --pairs, an fp16 export and the evaluation report, end
    to end in run_dir: what `python train.py all` runs (the README's GPU recipe)."""

    mismatched_ages: bool = option(True, "matching-aware D, as the default model was trained")
    hflip: bool = option(True, "random horizontal flips, as the default model was trained")
    ema_decay: float = option(0.999, "G's weights averaged, as the default model's were")
    epochs: int = option(100, "stage-1 passes over the training faces (the paper's horizon)")
    snapshot_every: int = option(0, "steps between kept fp16 weight exports of stage 1 (0: none)")
    pairs: int = option(100_000, "stage 2's (z, y) pairs, as the paper")
    encoder_epochs: int = option(3, "stage-2 passes over the pairs")
    evaluate_limit: int = option(500, "test faces the evaluation ages (0: no evaluation)")


def train_all(options: AllOptions) -> TrainResult:
    """Run stages 1 and 2, export the model in fp16 and evaluate it; prints images/s."""
    folder = Path(options.run_dir or default_run_dir("all"))
    shared = {f.name: getattr(options, f.name) for f in dataclasses.fields(RunOptions)}
    gan_fields = {f.name for f in dataclasses.fields(GanOptions)}
    gan_values = {k: v for k, v in dataclasses.asdict(options).items() if k in gan_fields}
    gan = train_gan(GanOptions(**(gan_values | {"run_dir": str(folder / "gan")})))
    stage_2 = {"run_dir": str(folder / "encoder"), "snapshot_every": 0, "max_steps": 0}
    stage_2 |= {"epochs": options.encoder_epochs}
    encoder = train_encoder(
        EncoderOptions(
            **(shared | stage_2),
            generator=str(gan.model_dir),
            pairs=options.pairs,
            data=options.data,
        )
    )
    model_dir = folder / "model"
    export_model(
        model_dir,
        encoder.networks["encoder"].config,
        torch.float16,
        encoder=load_network(encoder.model_dir, "encoder"),
        generator=load_network(encoder.model_dir, "generator"),
        discriminator=load_network(encoder.model_dir, "discriminator"),
    )
    for stage, result in (("stage 1", gan), ("stage 2", encoder)):
        speeds = result.speeds[len(result.speeds) // 10 :] or result.speeds  # after warm-up
        print(f"{stage}: {statistics.median(speeds):,.0f} images/s (median)", file=sys.stderr)
    if options.evaluate_limit:
        from agecgan.evaluate import main as evaluate

        limit = str(options.evaluate_limit)
        evaluate(["report", "--model", str(model_dir), "--data", options.data, "--limit", limit])
    return TrainResult(model_dir, encoder.networks | gan.networks, gan.speeds + encoder.speeds)
