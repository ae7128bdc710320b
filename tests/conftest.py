"""Shared fixtures: the real face photos that ship inside scikit-image and matplotlib."""

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    """Eileen Collins, 512x512 RGB uint8 (scikit-image, public domain)."""
    return pytest.importorskip("skimage.data").astronaut()


@pytest.fixture(scope="session")
def camera() -> np.ndarray:
    """The cameraman, 512x512 grayscale uint8: a small face in three-quarter view."""
    return pytest.importorskip("skimage.data").camera()


@pytest.fixture(scope="session")
def grace_hopper() -> Path:
    """Grace Hopper, a 512x600 RGB JPEG file (matplotlib sample data, public domain)."""
    matplotlib = pytest.importorskip("matplotlib")
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="module")
def aligner():
    """The process-wide aligner that align_face uses too (one MTCNN), run on one thread.

    MTCNN's small convolutions gain little from a second thread, and beside other work on a
    2-core machine OpenMP's spinning threads made each detection up to 20x slower. The thread
    count is restored when the module's tests are done.
    """
    import torch

    from agecgan.align import default_aligner

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield default_aligner()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """Gradio's cache folder for this module: where uploads land and results are served."""
    folder = tmp_path_factory.mktemp("gradio")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folder))
        yield folder
