"""Shared by the tests: a tiny architecture that trains in milliseconds, a free port, the
Gradio app as a module."""

import contextlib
import importlib.util
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

from agecgan import AgeCGANConfig

# A few channels per layer: the recipe's structure at a fraction of a percent of its size.
TINY = AgeCGANConfig(
    encoder_widths=(4, 8, 8, 8),
    encoder_hidden=16,
    generator_hidden=16,
    generator_widths=(8, 8, 4),
    discriminator_widths=(4, 8, 8, 8),
)


def vivid_generator():
    """A random tiny G that heeds its age condition: a random G barely does, so its six ages
    (and a blend of them) would look alike, and the age change the "detail" drawing adds to the
    photo would be nil. Seeded: the same G every time."""
    import torch

    from agecgan import Generator

    torch.manual_seed(0)
    generator = Generator(TINY)
    with torch.no_grad():
        generator.project[0].weight[:, TINY.z_dim :] *= 30  # each age clearly different
        generator.synthesis[-2].weight *= 5  # and its faces not all one gray
    return generator


ESTIMATED = re.compile(
    r"input age not given: estimated from the photo as about (\d+) \((\d+-\d+|60\+)\); "
    r"type the age to override"
)


def estimated_bucket(notes) -> str:
    """The bucket label of the one note saying the input age was estimated (asserted)."""
    [label] = [m.group(2) for note in notes if (m := ESTIMATED.fullmatch(str(note)))]
    return label


def free_port() -> int:
    """A loopback port that is free now (for a test server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_app(name: str = "agecgan_app"):
    """app/app.py as a module: a script folder, importable however pytest was started."""
    path = Path(__file__).resolve().parents[1] / "app" / "app.py"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def streamlit_answers(server, port: int, timeout: float = 60) -> dict[str, tuple[int, bytes]]:
    """Poll a starting `streamlit run` process on loopback (never through a proxy) until its
    page and health check answer: path -> (status, body)."""
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    answers, deadline = {}, time.monotonic() + timeout
    while len(answers) < 2 and time.monotonic() < deadline and server.poll() is None:
        for path in ("/", "/_stcore/health"):
            try:
                with local.open(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
                    answers[path] = (answer.status, answer.read())
            except OSError:
                time.sleep(0.5)
    return answers


@contextlib.contextmanager
def serving(webapp, demo):
    """The Gradio app's own launch() on a free loopback port: yields its URL, closes after."""
    port = free_port()
    webapp.launch(
        demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
