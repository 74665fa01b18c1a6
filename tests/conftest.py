"""Shared fixtures: tiny random models of real architectures (no download) and the real default model."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from kvgeom.testing import ARCHITECTURES, tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# property tests (issue #17): few examples, no deadline (the cores are shared); HYPOTHESIS_PROFILE=thorough for more
settings.register_profile("kvgeom", max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "kvgeom"))

_TINY: dict[str, object] = {}


def get_tiny(arch: str):
    if arch not in _TINY:
        _TINY[arch] = tiny_model(arch)
    return _TINY[arch]


@pytest.fixture(params=ARCHITECTURES)
def tiny(request):
    """A tiny random KVModel, once per architecture (shared across tests)."""
    return get_tiny(request.param)


@pytest.fixture
def tiny_llama():
    return get_tiny("llama")


@pytest.fixture(scope="session")
def default_model():
    """The real default model (Qwen2.5-Coder-0.5B-Instruct), CPU fp32. Installed by the setup command."""
    from kvgeom.models import load_model
    from kvgeom.registry import ModelNotInstalledError

    try:
        return load_model(device="cpu")
    except ModelNotInstalledError as err:  # the setup command installs it: missing means setup is broken
        pytest.fail(f"default model not installed: {err}")


PROMPTS = [
    "How do I bake bread at home?",
    "hi",
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run on a machine with a GPU (the device machine); elsewhere they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
