"""Fixtures shared by the test files."""

import os

import pytest


@pytest.fixture
def skip_unless_ci():
    """`skip_unless_ci(reason)`: skip a test that needs the package registry; in CI (`CI` set) fail instead, since the
    registry is part of CI's contract and a green run must not hide a real-model test that never ran."""
    def skip(reason: str) -> None:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: a test that needs the package registry fails instead of skipping)")
        pytest.skip(reason)

    return skip
