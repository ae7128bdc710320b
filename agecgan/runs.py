"""A training run's folder and bookkeeping, so that each stage's loop shows only the training.

`Run` claims the folder (never silently over another run, never two processes at once), checks
a saved state before anything is written, hands out the batches of every epoch (a resumed run
skips those it trained on), and keeps the progress bar, TensorBoard scalars, sample grids,
weight snapshots and atomic state saves. Under torchrun every process makes one.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import pickle
import shutil
import time
import typing
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from agecgan.checkpoints import (
    atomic_write,
    export_model,
    load_training_state,
    save_training_state,
)
from agecgan.networks import AgeCGANConfig, to_uint8
from agecgan.runtime import (
    autocast,
    hardware,
    resolve_precision,
    start_runtime,
    stop_runtime,
    sync_buffers,
    wrap_distributed,
)

STATE_NAME = "state.pt"
PREVIOUS_STATE_NAME = "state.prev.pt"  # the state before the last save: a fallback if it is damaged
OPTIONS_NAME = "options.json"
LOCK_NAME = ".lock"
SNAPSHOT_DIR = "snapshots"  # fp16 weight exports every snapshot_every steps
MODEL_DIR = "model"  # finished weights: <run>/model/{generator,discriminator,...}.safetensors
SAMPLE_DIR = "samples"
LOG_DIR = "tensorboard"
# What a run writes: --overwrite removes exactly these before starting over.
RUN_CONTENTS = (STATE_NAME, PREVIOUS_STATE_NAME, OPTIONS_NAME, SNAPSHOT_DIR, MODEL_DIR)
RUN_CONTENTS += (SAMPLE_DIR, LOG_DIR)


def option(default, help: str):
    """A dataclass field whose help text the command line shows (train.py --help)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class RunOptions:
    """Options every stage shares."""

    run_dir: str = option(
        "", "where state, samples, logs and weights go (default runs/<stage>-<time>)"
    )
    resume: bool = option(False, "continue from run_dir/state.pt")
    overwrite: bool = option(False, "start over in a run_dir that holds a run, deleting it")
    seed: int = option(0, "seeds weights, data order and noise")
    device: str = option("auto", "auto: CUDA when present, else the CPU; or cpu, cuda, cuda:1")
    precision: typing.Literal["auto", "fp32", "bf16"] = option(
        "auto", "auto: bf16 where the device computes it natively (CUDA, AMX/AVX512-BF16 CPUs)"
    )
    channels_last: bool = option(True, "NHWC memory format: measured faster with oneDNN on CPU")
    batch_size: int = option(128, "per process; the recipe's batch")
    epochs: int = option(1, "passes over the training items")
    max_steps: int = option(0, "stop after this many optimizer steps in total (0: all epochs)")
    save_every: int = option(
        200, "steps between saved states: a killed run loses at most this many"
    )
    snapshot_every: int = option(
        0, "steps between kept fp16 weight exports in snapshots/ (0: none)"
    )
    sample_every: int = option(200, "steps between sample grids")
    log_every: int = option(10, "steps between TensorBoard scalars")
    sample_columns: int = option(8, "faces per row of the sample grid")
    progress: bool = option(True, "progress bar on rank 0")

    # Options that place the run's steps: a resumed run must keep them (RunFolderError).
    RESUME_FIXED: typing.ClassVar[tuple[str, ...]] = ("batch_size", "seed")

    def __post_init__(self):
        """Refuse a value outside a Literal option's choices (precision="fp16" is an error)."""
        hints = typing.get_type_hints(type(self))
        for item in dataclasses.fields(self):
            choices = typing.get_args(hints[item.name])
            if typing.get_origin(hints[item.name]) is typing.Literal:
                value = getattr(self, item.name)
                if value not in choices:
                    allowed = ", ".join(map(str, choices))
                    raise ValueError(f"{item.name} must be one of {allowed}, not {value!r}")


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message says what to do instead."""


def epoch_batches(
    num_items: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> list[torch.Tensor]:
    """This process's batches of item indices for one epoch: a seeded shuffle, split by rank.

    Every process draws the same permutation, so the ranks' slices never overlap; incomplete
    batches are dropped, as the recipe does (batch norm needs full batches).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    global_batch = batch_size * world_size
    batches = []
    for start in range(0, num_items - global_batch + 1, global_batch):
        chunk = order[start : start + global_batch]
        batches.append(chunk[rank * batch_size : (rank + 1) * batch_size])
    return batches


def default_run_dir(stage: str) -> str:
    """runs/<stage>-<date>-<time>: a new folder per run started without --run-dir."""
    return str(Path("runs") / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}")


def save_grid(rows: list[torch.Tensor], path: Path) -> np.ndarray:
    """Save faces as a grid: each row a (C, 3, H, W) batch in [-1, 1]. Returns the uint8 image."""
    grid = torch.cat([torch.cat(list(to_uint8(row.cpu())), dim=1) for row in rows], dim=0)
    array = grid.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        Image.fromarray(array).save(tmp)
    return array


class Run:
    """One stage's run in one process: the folder, the runtime, the step count and the logs.

    >>> run = Run(options, "gan")
    >>> state = run.resume()  # after building networks: None, or the saved state
    >>> for indices in run.batches(len(dataset)):
    ...     losses = ...  # one training step on dataset[indices]
    ...     run.log(losses)
    ...     if run.due(options.save_every):
    ...         run.save_state({"generator": G.state_dict(), ...})
    >>> run.finish(config, generator=G)
    """

    def __init__(self, options: RunOptions, stage: str):
        self.options, self.stage = options, stage
        self.runtime = start_runtime(options.device)
        self.device = self.runtime.device
        self.precision, self.precision_reason = resolve_precision(options.precision, self.device)
        self.folder = self._name_folder()
        self._lock = None
        self._saved = None
        if self.runtime.is_main:
            self._claim_folder()
        self.step = self.total = 0
        if options.resume:
            self._saved = self._read_state()  # before anything in the folder changes
            self.step = self._saved["step"]
        if self.runtime.is_main:
            self._clear_folder()
        torch.manual_seed(options.seed)  # identical initial weights on every rank
        self.noise = torch.Generator().manual_seed(  # per process: different per rank
            options.seed * 1_000_003 + 7919 * (self.runtime.rank + 1)
        )
        if self.runtime.is_main:
            self._write_options()
        self.writer = None
        if self.runtime.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder / LOG_DIR))
        self.bar = None
        self._step_started = time.perf_counter()
        self.speeds: list[float] = []  # images/s of each step this process trained (benchmarks)

    # ---- the folder ---------------------------------------------------------------------

    def _name_folder(self) -> Path:
        options = self.options
        if not options.run_dir:
            name = [default_run_dir(self.stage)]
            if self.runtime.world_size > 1:
                dist.broadcast_object_list(name, src=0)  # the ranks' clocks may straddle a second
            options.run_dir = name[0]
        return Path(options.run_dir)

    def _claim_folder(self) -> None:
        """Lock the folder for this process; refuse to train over a run without being asked."""
        folder, options = self.folder, self.options
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / LOCK_NAME, "a+")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            holder = self._lock.read().strip() or "another process"
            self._lock.close()
            raise RunFolderError(
                f"{folder} is in use by another training process ({holder}): wait for it to "
                "finish or stop it, or choose another --run-dir"
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"pid {os.getpid()}\n")
        self._lock.flush()
        existing = [name for name in RUN_CONTENTS if (folder / name).exists()]
        if options.resume:
            if not (folder / STATE_NAME).exists():
                raise FileNotFoundError(
                    f"--resume: no {STATE_NAME} in {folder}: nothing to resume (leave out "
                    "--resume to start a new run there)"
                )
        elif existing and not options.overwrite:
            raise RunFolderError(
                f"{folder} already holds a run ({', '.join(existing)}): resume it with --resume, "
                "start over in it with --overwrite (which deletes it), or choose another --run-dir"
            )

    def _clear_folder(self) -> None:
        """Remove what a killed save left, and with --overwrite the run that was there."""
        folder = self.folder
        for stale in [*folder.glob("*.tmp*"), *folder.glob("*.link")]:
            stale.unlink()
        if self.options.overwrite and not self.options.resume:
            for name in RUN_CONTENTS:
                path = folder / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    def _read_state(self) -> dict:
        """The saved state, checked: readable, and trained with the options that place steps."""
        path = self.folder / STATE_NAME
        try:
            state = load_training_state(path, self.device)
            saved = json.loads(state["options"])
            step = int(state["step"])
        except (
            OSError,
            RuntimeError,
            EOFError,
            KeyError,
            TypeError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
        ) as error:
            reason = (str(error).splitlines() or [""])[0][:120]  # torch's advice would mislead
            raise RunFolderError(
                f"{path} is damaged ({type(error).__name__}: {reason}); nothing was changed. "
                + self._fallback_hint()
            ) from error
        changed = [
            name
            for name in self.options.RESUME_FIXED
            if name in saved and saved[name] != _as_json(getattr(self.options, name))
        ]
        if changed:
            was = ", ".join(f"--{n.replace('_', '-')} {saved[n]}" for n in changed)
            now = ", ".join(f"{getattr(self.options, n)}" for n in changed)
            raise RunFolderError(
                f"--resume: {path} (step {step}) was trained with {was}, not {now}: resuming "
                "with other values would misplace its epoch and data order. Resume with the "
                "saved values, or start a new run (another --run-dir)."
            )
        return state

    def _fallback_hint(self) -> str:
        previous = self.folder / PREVIOUS_STATE_NAME
        if previous.exists():
            try:
                step = load_training_state(previous, "cpu")["step"]
            except Exception:  # noqa: BLE001 (any failure means: not a usable fallback)
                step = None
            if step is not None:
                return (
                    f"The previous state {previous} (step {step}) is intact: move it to "
                    f"{self.folder / STATE_NAME} and resume again, or start over with --overwrite."
                )
        return "Start over with --overwrite, or in another --run-dir."

    def _write_options(self) -> None:
        resolved = {
            "stage": self.stage,
            **dataclasses.asdict(self.options),
            "resolved_device": str(self.device),
            "resolved_precision": self.precision,
            "precision_reason": self.precision_reason,
            "world_size": self.runtime.world_size,
            "hardware": hardware(self.device),
            "torch": torch.__version__,
        }
        with atomic_write(self.folder / OPTIONS_NAME) as tmp:
            tmp.write_text(json.dumps(resolved, indent=2) + "\n")

    # ---- networks ---------------------------------------------------------------------------

    def place(self, network: nn.Module) -> nn.Module:
        """The network on this run's device, in channels-last when asked."""
        network = network.to(self.device)
        if self.options.channels_last:
            network = network.to(memory_format=torch.channels_last)
        return network

    def distributed(self, network: nn.Module) -> nn.Module:
        return wrap_distributed(network, self.runtime)

    def faces(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of faces on the device, in the networks' memory format."""
        memory_format = torch.channels_last if self.options.channels_last else None
        x = x.to(self.device)
        return x.contiguous(memory_format=memory_format) if memory_format else x.contiguous()

    def autocast(self):
        return autocast(self.device, self.precision)

    def resume(self) -> dict | None:
        """The saved state when resuming (and the noise and RNG states restored), else None.
        Call it after building the networks: their initialization draws from the global RNG."""
        if self._saved is None:
            return None
        states = self._saved["random"]
        if len(states) != self.runtime.world_size:
            raise RunFolderError(
                f"the saved state is from {len(states)} processes, this run has "
                f"{self.runtime.world_size}: resume with the same process count"
            )
        state = states[self.runtime.rank]
        self.noise.set_state(state["noise"].cpu())
        torch.set_rng_state(state["torch"].cpu())
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
        return self._saved

    # ---- the loop ---------------------------------------------------------------------------

    def batches(self, num_items: int) -> Iterator[torch.Tensor]:
        """This process's item indices, one batch per step, epoch after epoch, until the last
        step; self.step counts the step being trained (1 for the first)."""
        options, runtime = self.options, self.runtime
        global_batch = options.batch_size * runtime.world_size
        steps_per_epoch = num_items // global_batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"{num_items} training items cannot fill one batch of {options.batch_size} x "
                f"{runtime.world_size} processes"
            )
        total = options.epochs * steps_per_epoch
        self.total = min(total, options.max_steps) if options.max_steps else total
        self.bar = tqdm(
            total=self.total,
            initial=self.step,
            unit="step",
            desc=f"{self.stage} ({self.precision})",
            disable=not (options.progress and runtime.is_main),
        )
        while self.step < self.total:
            self.epoch, skip = divmod(self.step, steps_per_epoch)
            batches = epoch_batches(
                num_items,
                options.batch_size,
                self.epoch,
                options.seed,
                runtime.rank,
                runtime.world_size,
            )
            for indices in batches[skip:]:
                if self.step >= self.total:
                    break
                self.step += 1
                self._step_started = time.perf_counter()
                yield indices
        self.bar.close()

    def log(self, losses: dict[str, float]) -> None:
        """Progress bar and, every log_every steps, TensorBoard: the losses and images/s."""
        global_batch = self.options.batch_size * self.runtime.world_size
        speed = global_batch / (time.perf_counter() - self._step_started)
        self.speeds.append(speed)
        self.bar.update(1)
        self.bar.set_postfix(
            {name.split("/")[-1]: f"{value:.3f}" for name, value in losses.items()}
            | {"img_s": f"{speed:.0f}"}
        )
        if self.writer and self.step % self.options.log_every == 0:
            scalars = losses | {"speed/images_per_s": speed, "epoch": self.epoch}
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, self.step)

    def due(self, every: int, at_end: bool = True) -> bool:
        """Whether this step is one of every `every` (or the last step, when at_end)."""
        return bool(every) and (self.step % every == 0 or (at_end and self.step == self.total))

    def save_grid(self, rows: list[torch.Tensor]) -> None:
        """A sample grid (rows of faces in [-1, 1]) into samples/ and TensorBoard (rank 0)."""
        if self.runtime.is_main:
            grid = save_grid(rows, self.folder / SAMPLE_DIR / f"{self.step:07d}.png")
            self.writer.add_image("samples", grid, self.step, dataformats="HWC")

    def save_state(self, contents: dict) -> None:
        """Save the state atomically with the step, the options and every rank's random
        states; the state before it is kept as state.prev.pt. Call it on every rank."""
        contents = contents | {"random": self._random_states()}
        if self.runtime.is_main:
            contents |= {"step": self.step, "options": json.dumps(dataclasses.asdict(self.options))}
            current = self.folder / STATE_NAME
            if current.exists():  # a hard link: state.pt itself is never missing, even briefly
                link = self.folder / (PREVIOUS_STATE_NAME + ".link")
                link.unlink(missing_ok=True)
                os.link(current, link)
                os.replace(link, self.folder / PREVIOUS_STATE_NAME)
            save_training_state(current, contents)

    def _random_states(self) -> list[dict]:
        state = {"noise": self.noise.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.runtime.world_size == 1:
            return [state]
        states: list = [None] * self.runtime.world_size
        dist.all_gather_object(states, state)
        return states

    def snapshot(self, config: AgeCGANConfig, **networks: nn.Module) -> None:
        """fp16 weights into snapshots/step-NNNNNNN, so that a step can be chosen later."""
        if self.runtime.is_main:
            folder = self.folder / SNAPSHOT_DIR / f"step-{self.step:07d}"
            export_model(folder, config, torch.float16, **networks)

    def finish(self, export, **networks: nn.Module) -> Path:
        """Give every rank rank 0's batch-norm statistics, export the finished weights with
        export(model_dir) on rank 0, close the logs and leave the process group."""
        for network in networks.values():
            sync_buffers(network, self.runtime)
        model_dir = self.folder / MODEL_DIR
        if self.runtime.is_main:
            export(model_dir)
            self.writer.close()
        stop_runtime(self.runtime)
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
        return model_dir


def _as_json(value):
    """A value as options.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))
