"""Shared test setup: every test gets a private, empty on-disk cache directory."""

import pytest

from spectral_jax.ops import filters


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Point the on-disk cache at a per-test directory and clear the in-memory filter cache."""
    monkeypatch.setenv("SPECTRAL_JAX_CACHE", str(tmp_path / "cache"))
    filters.clear_memory_cache()
    yield tmp_path / "cache"
    filters.clear_memory_cache()
