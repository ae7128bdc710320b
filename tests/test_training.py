"""Stages 1 and 2 end to end on tiny networks: outputs, exact resume, a killed run, torchrun."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY
from PIL import Image
from safetensors.torch import load_file

from agecgan.ages import one_hot
from agecgan.align import DEFAULT_FRAMING
from agecgan.checkpoints import load_network, load_training_state
from agecgan.networks import to_model_range
from agecgan.prepare import FaceDataset, save_cache
from agecgan.runs import RunFolderError
from agecgan.runtime import native_bf16
from agecgan.training import (
    EncoderOptions,
    GanOptions,
    IdentityOptions,
    train_encoder,
    train_gan,
    train_identity,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared-dataset folder of 48 random faces with ages, about 10% of them test faces."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    count = 48
    save_cache(
        folder / "faces.npz",
        images=rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8),
        ages=rng.integers(1, 90, count).astype(np.int16),
        buckets=rng.integers(0, 6, count).astype(np.int8),
        split=(np.arange(count) % 10 == 0).astype(np.int8),
        names=np.array([f"{i}.jpg" for i in range(count)]),
        framing=np.array([DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height], np.float32),
    )
    return folder


def gan_options(data: Path, run_dir: Path, **overrides) -> GanOptions:
    values = dict(
        data=str(data),
        run_dir=str(run_dir),
        config=TINY.to_dict(),
        batch_size=8,
        epochs=3,
        save_every=2,
        sample_every=3,
        log_every=1,
        sample_columns=4,
        progress=False,
    )
    return GanOptions(**(values | overrides))


def test_gan_stage_writes_everything_a_run_needs(tiny_data, tmp_path):
    result = train_gan(gan_options(tiny_data, tmp_path / "run", max_steps=4))
    run = tmp_path / "run"
    options = json.loads((run / "options.json").read_text())
    assert options["stage"] == "gan" and options["lr_g"] == 2e-4 and options["real_label"] == 0.9
    assert load_training_state(run / "state.pt")["step"] == 4
    grid = Image.open(run / "samples" / "0000003.png")
    assert grid.size == (4 * 64, 6 * 64)  # one row per age bucket, one column per fixed z
    assert list((run / "tensorboard").iterdir())
    assert result.model_dir == run / "model"
    G = load_network(result.model_dir, "generator")
    assert G.config == TINY
    for key, value in load_file(run / "model" / "generator.safetensors").items():
        assert torch.equal(value, result.networks["generator"].state_dict()[key].cpu())


def test_snapshots_keep_fp16_weights_of_chosen_steps(tiny_data, tmp_path):
    result = train_gan(gan_options(tiny_data, tmp_path / "run", max_steps=4, snapshot_every=2))
    snapshots = tmp_path / "run" / "snapshots"
    assert sorted(path.name for path in snapshots.iterdir()) == ["step-0000002", "step-0000004"]
    G = load_network(snapshots / "step-0000004", "generator")  # loaded back as fp32
    finished = result.networks["generator"].state_dict()
    for key, value in G.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, finished[key].float(), rtol=1e-3, atol=1e-3), key


def test_mismatched_ages_teach_d_to_judge_the_age(tiny_data, tmp_path):
    faces = FaceDataset.load(tiny_data, split="train")
    x, right, wrong = (
        to_model_range(faces.images),
        one_hot(faces.buckets),
        one_hot((faces.buckets + 3) % 6),
    )
    gaps = {}
    for mismatched in (False, True):
        options = gan_options(
            tiny_data, tmp_path / str(mismatched), epochs=100, max_steps=150, lr_d=1e-3
        )
        D = train_gan(dataclasses.replace(options, mismatched_ages=mismatched))
        D = D.networks["discriminator"].eval()
        with torch.no_grad():
            gaps[mismatched] = (D(x, right) - D(x, wrong)).mean().item()
    # Real faces with their own ages look more real to D than the same faces with other ages,
    # by far more than the recipe's D, which never sees a real face with a wrong age.
    assert gaps[True] > 1.0 and gaps[True] > 3 * abs(gaps[False])
    resumed = gan_options(tiny_data, tmp_path / "resumed", max_steps=3, mismatched_ages=True)
    train_gan(resumed)
    straight = train_gan(
        gan_options(tiny_data, tmp_path / "straight", max_steps=5, mismatched_ages=True)
    )
    again = train_gan(dataclasses.replace(resumed, max_steps=5, resume=True))
    a, b = (
        straight.networks["discriminator"].state_dict(),
        again.networks["discriminator"].state_dict(),
    )
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_continues_exactly_where_the_run_stopped(tiny_data, tmp_path):
    straight = train_gan(gan_options(tiny_data, tmp_path / "straight", max_steps=6))
    train_gan(gan_options(tiny_data, tmp_path / "resumed", max_steps=4))
    resumed = train_gan(gan_options(tiny_data, tmp_path / "resumed", max_steps=6, resume=True))
    for name in ("generator", "discriminator"):
        a = straight.networks[name].state_dict()
        b = resumed.networks[name].state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a), name


def test_the_average_of_g_ships_resumes_exactly_and_can_start_late(tiny_data, tmp_path):
    def run(name, **overrides):
        return train_gan(gan_options(tiny_data, tmp_path / name, ema_decay=0.5, **overrides))

    straight = run("straight", max_steps=6)
    run("resumed", max_steps=4)
    resumed = run("resumed", max_steps=6, resume=True)
    a, b = straight.networks["generator"].state_dict(), resumed.networks["generator"].state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    state = load_training_state(tmp_path / "straight" / "state.pt")
    shipped = load_file(tmp_path / "straight" / "model" / "generator.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in state["generator_average"].items())
    assert any(
        not torch.equal(state["generator"][k], v) for k, v in state["generator_average"].items()
    )
    # A run that turns the average on when resumed starts it from G's weights at that step.
    before = train_gan(gan_options(tiny_data, tmp_path / "late", max_steps=4))
    before = {k: v.clone() for k, v in before.networks["generator"].state_dict().items()}
    late = run("late", max_steps=5, resume=True).networks["generator"]
    after = load_training_state(tmp_path / "late" / "state.pt")["generator"]
    for name, _ in late.named_parameters():
        expected = 0.5 * before[name] + 0.5 * after[name]
        assert torch.allclose(late.state_dict()[name], expected, atol=1e-6), name


def test_resume_without_state_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        train_gan(gan_options(tiny_data, tmp_path / "empty", resume=True))


def test_encoder_stage_learns_to_invert_the_generator(tiny_data, tmp_path):
    gan = train_gan(gan_options(tiny_data, tmp_path / "gan", max_steps=2))
    options = EncoderOptions(
        generator=str(gan.model_dir),
        run_dir=str(tmp_path / "enc"),
        pairs=256,
        epochs=4,
        batch_size=32,
        lr=1e-3,
        save_every=8,
        sample_every=16,
        log_every=1,
        sample_columns=3,
        progress=False,
        data=str(tiny_data),
    )
    result = train_encoder(options)
    folder = result.model_dir
    assert {p.name for p in folder.iterdir()} >= {
        "encoder.safetensors",
        "generator.safetensors",
        "discriminator.safetensors",
        "config.json",
    }
    grid = Image.open(tmp_path / "enc" / "samples" / "0000016.png")
    assert grid.size == (3 * 64, 7 * 64)  # inputs, then one row per age bucket
    losses = _tensorboard_scalars(tmp_path / "enc" / "tensorboard", "loss/euclidean")
    assert np.mean(losses[-4:]) < np.mean(losses[:4])  # it learns something


def _tensorboard_scalars(folder: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return [event.value for event in accumulator.Scalars(tag)]


def test_train_cli_dry_run_prints_the_recipe_defaults():
    out = subprocess.run(
        [sys.executable, "train.py", "gan", "--dry-run"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    options = json.loads(out)
    assert (options["batch_size"], options["lr_d"], options["beta1"]) == (128, 2e-4, 0.5)


def test_a_killed_run_leaves_a_loadable_state_and_resumes(tiny_data, tmp_path):
    """SIGKILL at an arbitrary moment while states are written every step."""
    run = tmp_path / "killed"
    code = (
        f"from agecgan.training import GanOptions, train_gan; from agecgan import "
        f"AgeCGANConfig; import json; train_gan(GanOptions(data={str(tiny_data)!r}, "
        f"run_dir={str(run)!r}, config=json.loads({json.dumps(TINY.to_dict())!r}), "
        f"batch_size=8, epochs=1000, save_every=1, sample_every=1000, progress=False))"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 120
    while not (run / "state.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # now it writes a state every few milliseconds
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = load_training_state(run / "state.pt")["step"]
    assert step >= 1
    resumed = train_gan(gan_options(tiny_data, run, epochs=1000, max_steps=step + 2, resume=True))
    assert load_training_state(run / "state.pt")["step"] == step + 2
    assert resumed.model_dir.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on loopback")
def test_torchrun_two_processes_hold_identical_weights(tiny_data, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(29500 + os.getpid() % 1000),
            str(ROOT / "tests" / "ddp_worker.py"),
            str(tiny_data),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 3
    for name in ("generator", "discriminator"):
        a, b = ranks[0][name], ranks[1][name]
        assert all(torch.equal(a[key], b[key]) for key in a), name
    # They trained: the weights moved away from the common initialisation.
    initial = ranks[0]["initial_generator"]
    assert any(not torch.equal(initial[k], ranks[0]["generator"][k]) for k in initial)


def test_identity_stage_tunes_the_encoder_and_leaves_the_input_model_alone(tiny_data, tmp_path):
    gan = train_gan(gan_options(tiny_data, tmp_path / "gan", max_steps=1))
    encoder = train_encoder(
        EncoderOptions(
            generator=str(gan.model_dir),
            run_dir=str(tmp_path / "enc"),
            pairs=64,
            batch_size=32,
            epochs=1,
            progress=False,
        )
    )
    before = {p.name: p.read_bytes() for p in encoder.model_dir.iterdir()}
    options = IdentityOptions(
        model=str(encoder.model_dir),
        data=str(tiny_data),
        run_dir=str(tmp_path / "id"),
        batch_size=8,
        max_steps=3,
        save_every=2,
        sample_every=3,
        sample_columns=2,
        progress=False,
    )
    result = train_identity(options)
    assert {p.name: p.read_bytes() for p in encoder.model_dir.iterdir()} == before
    tuned = load_network(result.model_dir, "encoder")
    original = load_network(encoder.model_dir, "encoder")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(tuned.state_dict().values(), original.state_dict().values(), strict=True)
    )
    same_generator = load_file(result.model_dir / "generator.safetensors")
    original_generator = load_file(encoder.model_dir / "generator.safetensors")
    assert all(torch.equal(same_generator[k], v) for k, v in original_generator.items())
    assert Image.open(tmp_path / "id" / "samples" / "0000003.png").size == (2 * 64, 7 * 64)
    resumed = train_identity(
        IdentityOptions(**(dataclasses.asdict(options) | {"max_steps": 4, "resume": True}))
    )
    assert load_training_state(tmp_path / "id" / "state.pt")["step"] == 4
    assert resumed.model_dir == result.model_dir


def test_a_folder_that_holds_a_run_is_never_trained_over_unasked(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_gan(gan_options(tiny_data, run, max_steps=2))
    before = {p.name: p.read_bytes() for p in (run / "model").iterdir()}
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        train_gan(gan_options(tiny_data, run, max_steps=2, seed=1))
    assert {p.name: p.read_bytes() for p in (run / "model").iterdir()} == before
    assert load_training_state(run / "state.pt")["step"] == 2
    # --overwrite starts over: step 0, and nothing of the old run is left to mix in.
    train_gan(gan_options(tiny_data, run, max_steps=1, overwrite=True, snapshot_every=0))
    assert load_training_state(run / "state.pt")["step"] == 1
    assert not (run / "state.prev.pt").exists()
    # The CLI says the same and exits 2, as argparse does for a bad argument.
    cli = [sys.executable, "train.py", "encoder", "--generator", str(run / "model")]
    cli += ["--run-dir", str(run), "--pairs", "64", "--batch-size", "32", "--no-progress"]
    done = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "already holds a run" in done.stderr, done.stderr


def test_resume_refuses_options_that_would_misplace_the_epoch(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_gan(gan_options(tiny_data, run, max_steps=2))
    options_before = (run / "options.json").read_text()
    with pytest.raises(RunFolderError, match="--batch-size 8"):
        train_gan(gan_options(tiny_data, run, max_steps=4, batch_size=4, resume=True))
    assert (run / "options.json").read_text() == options_before
    # Options that do not place steps may change on resume: a longer run, more snapshots.
    train_gan(gan_options(tiny_data, run, max_steps=3, snapshot_every=3, resume=True))
    assert load_training_state(run / "state.pt")["step"] == 3


def test_a_damaged_state_is_named_with_the_intact_previous_one(tiny_data, tmp_path):
    run = tmp_path / "run"
    train_gan(gan_options(tiny_data, run, max_steps=4))  # saves at 2 and 4
    assert load_training_state(run / "state.prev.pt")["step"] == 2
    (run / "state.pt").write_bytes(b"not a state")
    (run / "state.pt.tmp").write_bytes(b"half a save")
    listing = sorted(p.name for p in run.iterdir())
    options_before = (run / "options.json").read_text()
    with pytest.raises(RunFolderError, match=r"state\.pt is damaged.*state\.prev\.pt \(step 2\)"):
        train_gan(gan_options(tiny_data, run, max_steps=6, resume=True))
    assert sorted(p.name for p in run.iterdir()) == listing  # nothing changed
    assert (run / "options.json").read_text() == options_before
    os.replace(run / "state.prev.pt", run / "state.pt")  # what the message says to do
    train_gan(gan_options(tiny_data, run, max_steps=6, resume=True))
    assert load_training_state(run / "state.pt")["step"] == 6
    assert not (run / "state.pt.tmp").exists()  # the killed save's leftover is gone


def test_a_folder_in_use_by_another_run_is_refused(tiny_data, tmp_path):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as lock:
        lock.write("pid 12345\n")
        lock.flush()
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RunFolderError, match="in use by another training process"):
            train_gan(gan_options(tiny_data, run, max_steps=1))
    assert not (run / "options.json").exists()


def test_precision_is_checked_and_auto_says_what_it_chose(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        GanOptions(precision="fp16")
    train_gan(gan_options(tiny_data, tmp_path / "run", max_steps=1))
    options = json.loads((tmp_path / "run" / "options.json").read_text())
    assert options["precision"] == "auto"
    native, why = native_bf16(torch.device("cpu"))
    assert options["resolved_precision"] == ("bf16" if native else "fp32")
    assert options["precision_reason"] == f"auto: {why}"


def test_train_all_runs_both_stages_exports_fp16_and_evaluates(tmp_path):
    """The README's one GPU command, here on the CPU with tiny networks and data."""
    count = 120  # 12 test faces, 2 in each age bucket: what FID and KID per bucket need
    rng = np.random.default_rng(1)
    save_cache(
        tmp_path / "faces.npz",
        images=rng.integers(0, 256, (count, 64, 64, 3), dtype=np.uint8),
        ages=np.full(count, 30, np.int16),
        buckets=((np.arange(count) // 10) % 6).astype(np.int8),
        split=(np.arange(count) % 10 == 0).astype(np.int8),
        names=np.array([f"{i}.jpg" for i in range(count)]),
        framing=np.array([DEFAULT_FRAMING.scale, DEFAULT_FRAMING.eye_height], np.float32),
    )
    run = tmp_path / "all"
    command = [sys.executable, "train.py", "all", "--data", str(tmp_path), "--run-dir", str(run)]
    command += ["--epochs", "1", "--batch-size", "16", "--pairs", "64", "--encoder-epochs", "1"]
    command += ["--evaluate-limit", "12", "--no-progress", "--sample-every", "100"]
    command += ["--config", json.dumps(TINY.to_dict())]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stage 1:" in done.stderr and "images/s" in done.stderr
    model = run / "model"
    tensors = load_file(model / "generator.safetensors")
    assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert load_network(model, "encoder").config == TINY
    assert (model / "evaluation" / "evaluation.md").is_file()
