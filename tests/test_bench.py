"""The training bench: no peer means no ratio; the Keras peer is the recipe's networks.

The peer tests need the peer venv (`make peer`) and skip without it: `make test` and CI do not
install it (a 300 MB download per fresh clone).
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_training.py"
RATIO = re.compile(r"\d\.\d\dx\b")  # how the bench prints a ratio to the peer, e.g. 1.27x
RECIPE_COUNTS = {"encoder": 18_278_180, "generator": 34_852_099, "discriminator": 1_567_873}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_training", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_peer_says_so_and_prints_no_ratio(tmp_path):
    missing = tmp_path / "no-venv" / "bin" / "python"
    command = [sys.executable, str(BENCH), "--quick", "--sections", "inference"]
    result = subprocess.run(
        [*command, "--peer-python", str(missing)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "peer not installed" in result.stdout
    assert "batch 64" in result.stdout  # our rows are still there
    assert not RATIO.search(result.stdout), result.stdout


needs_peer = pytest.mark.skipif(
    not load_bench().PEER_PYTHON.exists(), reason="the Keras peer venv is absent (make peer)"
)


@needs_peer
def test_keras_peer_is_the_recipe_and_answers():
    bench = load_bench()
    peer = bench.KerasPeer(bench.PEER_PYTHON, threads=1, batch=4)
    try:
        assert peer.info["params"] == RECIPE_COUNTS
        assert all(peer.info["check"].values()), peer.info["check"]
        for name in ("stage1", "stage2", "infer1"):
            assert peer.rate(name, 1) > 0
    finally:
        peer.close()
