"""The book's Age-cGAN recipe in Keras, timed on request: the peer that bench_training.py measures.

    .venv-keras/bin/python bench/keras_peer.py --threads 2 [--batch 128] [--counts]

Runs in the peer venv (`make peer`: tensorflow-cpu and keras, pinned), never in the project's,
which does not import TensorFlow. The networks, losses, optimizers and training calls are the
chapter's. It speaks JSON lines: once built and self-checked it prints {"ready": true, ...}
(versions, thread counts, parameter counts, and whether each training call updates the networks
the chapter's does); then for each command read from stdin, {"run": NAME, "steps": N} with
NAME one of stage1, stage2, infer1, infer64, it runs N steps and prints {"rate": img/s}.
--counts prints the parameter counts and exits.
"""

import argparse
import json
import os
import sys
import time

Z_DIM, AGES, SIDE = 100, 6, 64  # the recipe's latent size, age buckets and face size


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="TF intra- and inter-op threads")
    parser.add_argument("--batch", type=int, default=128, help="training batch (the recipe's)")
    parser.add_argument(
        "--counts", action="store_true", help="print parameter counts and the self-check, and exit"
    )
    return parser.parse_args()


args = parse_args()
# Before TensorFlow loads: oneDNN's OpenMP pool reads this once, and TF's own log lines would
# otherwise mix into the caller's view of stderr.
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(args.threads)
tf.config.threading.set_inter_op_parallelism_threads(args.threads)


def build_encoder() -> keras.Model:
    """E as the chapter builds it: four 5x5 stride-2 convs, dense 4096, dense 100."""
    image = layers.Input(shape=(SIDE, SIDE, 3))
    h = image
    for index, filters in enumerate((32, 64, 128, 256)):
        h = layers.Conv2D(filters, kernel_size=5, strides=2, padding="same")(h)
        if index > 0:  # the chapter has no batch norm after the first conv
            h = layers.BatchNormalization()(h)
        h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.Flatten()(h)
    h = layers.Dense(4096)(h)
    h = layers.BatchNormalization()(h)
    h = layers.LeakyReLU(negative_slope=0.2)(h)
    z = layers.Dense(Z_DIM)(h)
    return keras.Model(inputs=image, outputs=z)


def build_generator() -> keras.Model:
    """G as the chapter builds it: two dense layers, then three upsample + 5x5 conv blocks."""
    z = layers.Input(shape=(Z_DIM,))
    y = layers.Input(shape=(AGES,))
    h = layers.concatenate([z, y])
    h = layers.Dense(2048)(h)
    h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.Dropout(0.2)(h)
    h = layers.Dense(256 * 8 * 8)(h)
    h = layers.BatchNormalization()(h)
    h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.Dropout(0.2)(h)
    h = layers.Reshape((8, 8, 256))(h)
    for filters in (128, 64):
        h = layers.UpSampling2D(size=(2, 2))(h)
        h = layers.Conv2D(filters, kernel_size=5, padding="same")(h)
        h = layers.BatchNormalization(momentum=0.8)(h)
        h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.UpSampling2D(size=(2, 2))(h)
    h = layers.Conv2D(3, kernel_size=5, padding="same")(h)
    face = layers.Activation("tanh")(h)
    return keras.Model(inputs=[z, y], outputs=face)


def tile_ages(y):
    """(N, 6) -> (N, 32, 32, 6): the chapter's expand_dims twice and tile."""
    return ops.tile(ops.expand_dims(ops.expand_dims(y, 1), 1), (1, 32, 32, 1))


def build_discriminator() -> keras.Model:
    """D as the chapter builds it: 3x3 stride-2 convs, y tiled in after the first, sigmoid."""
    image = layers.Input(shape=(SIDE, SIDE, 3))
    y = layers.Input(shape=(AGES,))
    h = layers.Conv2D(64, kernel_size=3, strides=2, padding="same")(image)
    h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.concatenate([h, layers.Lambda(tile_ages)(y)], axis=3)
    for filters in (128, 256, 512):
        h = layers.Conv2D(filters, kernel_size=3, strides=2, padding="same")(h)
        h = layers.BatchNormalization()(h)
        h = layers.LeakyReLU(negative_slope=0.2)(h)
    h = layers.Flatten()(h)
    valid = layers.Dense(1, activation="sigmoid")(h)
    return keras.Model(inputs=[image, y], outputs=valid)


def euclidean_distance_loss(y_true, y_pred):
    """Stage 2's loss, as the chapter writes it: ||y_pred - y_true||_2 per sample."""
    return ops.sqrt(ops.sum(ops.square(y_pred - y_true), axis=-1))


def trainable_count(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def recipe_adam() -> keras.optimizers.Adam:
    # The chapter's Adam(lr=0.0002, beta_1=0.5, beta_2=0.999, epsilon=10e-8); `lr` is now
    # spelled `learning_rate`.
    return keras.optimizers.Adam(learning_rate=2e-4, beta_1=0.5, beta_2=0.999, epsilon=10e-8)


class Recipe:
    """The chapter's compiled models and its training and inference calls, on synthetic data."""

    def __init__(self, batch: int):
        self.batch = batch
        self.rng = np.random.default_rng(0)
        # Stage 1 as the chapter compiles it: D, then G, then D frozen inside the combined model.
        self.discriminator = build_discriminator()
        self.discriminator.compile(loss=["binary_crossentropy"], optimizer=recipe_adam())
        self.generator = build_generator()
        gen_optimizer = recipe_adam()
        self.generator.compile(loss=["binary_crossentropy"], optimizer=gen_optimizer)
        self.discriminator.trainable = False
        z, y = layers.Input(shape=(Z_DIM,)), layers.Input(shape=(AGES,))
        valid = self.discriminator([self.generator([z, y]), y])
        self.adversarial = keras.Model(inputs=[z, y], outputs=valid)
        self.adversarial.compile(loss=["binary_crossentropy"], optimizer=gen_optimizer)
        # Stage 2: E with the Euclidean loss and Keras' default Adam, as the chapter.
        self.encoder = build_encoder()
        self.encoder.compile(loss=euclidean_distance_loss, optimizer="adam")

        # Synthetic faces and ages: speed does not depend on pixel values.
        self.faces = self.rng.uniform(-1, 1, (batch, SIDE, SIDE, 3)).astype(np.float32)
        self.ages = self.one_hot(batch)
        self.real_labels = np.ones((batch, 1), dtype=np.float32) * 0.9  # the recipe's smoothing
        self.fake_labels = np.zeros((batch, 1), dtype=np.float32)

    def one_hot(self, n: int) -> np.ndarray:
        return np.eye(AGES, dtype=np.float32)[self.rng.integers(0, AGES, n)]

    def noise(self, n: int) -> np.ndarray:
        return self.rng.normal(0, 1, size=(n, Z_DIM)).astype(np.float32)

    def stage1(self) -> None:
        """One iteration of the chapter's stage-1 loop body."""
        fakes = self.generator.predict_on_batch([self.noise(self.batch), self.ages])
        self.train_discriminator(fakes)
        self.train_generator()

    def train_discriminator(self, fakes: np.ndarray) -> None:
        # Keras 2 fixed trainability at compile; Keras 3 reads it when a model first traces its
        # train step, so with the chapter's single `trainable = False` D would never learn
        # (measured: D's weights stayed put). Setting it around the calls restores the
        # chapter's semantics; a frozen D's batch norm runs in inference mode, as Keras 3 does.
        self.discriminator.trainable = True
        self.discriminator.train_on_batch([self.faces, self.ages], self.real_labels)
        self.discriminator.train_on_batch([fakes, self.ages], self.fake_labels)
        self.discriminator.trainable = False

    def train_generator(self) -> None:
        targets = np.ones((self.batch, 1), dtype=np.float32)
        self.adversarial.train_on_batch([self.noise(self.batch), self.one_hot(self.batch)], targets)

    def stage2(self) -> None:
        """One iteration of the chapter's encoder loop: E learns z back from G(z, y)."""
        z = self.noise(self.batch)
        faces = self.generator.predict_on_batch([z, self.ages])
        self.encoder.train_on_batch(faces, z)

    def infer(self, n: int) -> None:
        self.generator.predict_on_batch([self.noise(n), self.one_hot(n)])

    def counts(self) -> dict:
        """Trainable parameters of E, G and D, D's taken while it is trainable."""
        self.discriminator.trainable = True
        counts = {
            "encoder": trainable_count(self.encoder),
            "generator": trainable_count(self.generator),
            "discriminator": trainable_count(self.discriminator),
        }
        self.discriminator.trainable = False
        return counts

    def check(self) -> dict:
        """Whether each training call updates what the chapter's updates, and nothing else."""
        D, G, E = self.discriminator, self.generator, self.encoder
        d0, g0, e0 = kernels(D), kernels(G), kernels(E)
        self.train_discriminator(G.predict_on_batch([self.noise(self.batch), self.ages]))
        d1, g1 = kernels(D), kernels(G)
        self.train_generator()
        d2, g2 = kernels(D), kernels(G)
        self.stage2()
        return {
            "D learns from its own train_on_batch": changed(d0, d1) and not changed(g0, g1),
            "D stays frozen while G learns": changed(g1, g2) and not changed(d1, d2),
            "E learns in stage 2": changed(e0, kernels(E)),
        }


def kernels(model: keras.Model) -> list[np.ndarray]:
    return [layer.kernel.numpy().copy() for layer in model.layers if hasattr(layer, "kernel")]


def changed(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def main() -> None:
    recipe = Recipe(args.batch)
    counts, check = recipe.counts(), recipe.check()
    if args.counts:
        print(json.dumps({"params": counts, "check": check}))
        return
    work = {
        "stage1": (recipe.stage1, args.batch),
        "stage2": (recipe.stage2, args.batch),
        "infer1": (lambda: recipe.infer(1), 1),
        "infer64": (lambda: recipe.infer(64), 64),
    }
    ready = {
        "ready": True,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        # TF uses oneDNN on x86 unless TF_ENABLE_ONEDNN_OPTS=0.
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0",
        "jit_compile": bool(recipe.adversarial.jit_compile),
        "params": counts,
        "check": check,
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        step, items = work[command["run"]]
        steps = int(command["steps"])
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rate = items * steps / (time.perf_counter() - start)
        print(json.dumps({"rate": rate}), flush=True)


if __name__ == "__main__":
    main()
