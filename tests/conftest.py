"""Fixtures shared by the test files. The tiny models, env and RLHF run several files build are plain functions
in tests/tiny.py (`from tiny import tiny_gpt`): no test file imports another."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """`CI` set to anything but empty, 0 or false (CI services set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false")


@pytest.fixture
def skip_unless_ci():
    """`skip_unless_ci(reason)`: skip a test that needs the package registry; in CI (`CI=true`) fail instead, since the
    registry is part of CI's contract and a green run must not hide a real-model test that never ran."""
    def skip(reason: str) -> None:
        if in_ci():
            pytest.fail(f"{reason} (CI is set: a test that needs the package registry fails instead of skipping)")
        pytest.skip(reason)

    return skip


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from threads, and on shared, busy cores spinning
    threads make them several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torchrun():
    """`torchrun(*argv, cwd, timeout=90)`: `torchrun --standalone --nproc-per-node 2 *argv` (CPU, one thread per
    rank, this checkout on PYTHONPATH), its output captured; past `timeout` seconds it raises TimeoutExpired, so a
    hang fails the test instead of blocking the suite."""
    def launch(*argv: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *argv]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)

    return launch
