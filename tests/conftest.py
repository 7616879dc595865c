"""Test-wide JAX settings: a persistent compilation cache so repeated runs compile less."""

import os
import pathlib

import jax

_CACHE = pathlib.Path(
    os.environ.get("JMOE_JAX_CACHE", pathlib.Path(__file__).parent.parent / ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    """Skips tests marked `gpu` / `tpu` when that backend is absent."""
    import pytest

    backend = jax.default_backend()
    for item in items:
        for marker in ("gpu", "tpu"):
            if marker in item.keywords and backend != marker:
                item.add_marker(pytest.mark.skip(reason=f"needs a {marker.upper()}"))
