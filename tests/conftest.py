"""Fixtures shared by the front-end tests. Helpers and constants live in nltest_support.py."""
from __future__ import annotations

import pytest

from tests.nltest_support import REPO

pytest_plugins = ["tests.device_faults"]


@pytest.fixture
def in_repo(monkeypatch):
    """Runs the test from the repository root, so spec paths are relative like in the docs."""
    monkeypatch.chdir(REPO)
    return REPO
