"""Shared test setup: CPU only, fast compiles, paths to the committed fixtures."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tiny models compile far longer than they run; XLA's heavy passes buy nothing here.
jax.config.update("jax_disable_most_optimizations", True)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fixtures_dir():
    return FIXTURES
