"""kvgeom.hub: one offline semantics (huggingface_hub's own), one reachability probe."""

import os
import subprocess
import sys
import time

import pytest

from kvgeom import hub

VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # frozen at its import: not what these tests vary
    return monkeypatch


@pytest.mark.parametrize("value, off", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("2", False), (" 1", False), ("", False),
])
def test_offline_values_as_huggingface_hub(clean_env, value, off):
    clean_env.setenv("HF_HUB_OFFLINE", value)
    assert hub.offline() is off
    clean_env.delenv("HF_HUB_OFFLINE")
    clean_env.setenv("TRANSFORMERS_OFFLINE", value)
    assert hub.offline() is off


def test_first_non_empty_variable_decides(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "0")
    clean_env.setenv("TRANSFORMERS_OFFLINE", "1")
    assert not hub.offline()  # HF_HUB_OFFLINE is set (to "0"): TRANSFORMERS_OFFLINE is not read
    clean_env.setenv("HF_HUB_OFFLINE", "")
    assert hub.offline_reason() == "TRANSFORMERS_OFFLINE=1 is set"


def test_datasets_variable_overrides_for_datasets_only(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "1")
    clean_env.setenv("HF_DATASETS_OFFLINE", "0")
    assert hub.offline() and not hub.offline(datasets=True)
    clean_env.setenv("HF_HUB_OFFLINE", "0")
    clean_env.setenv("HF_DATASETS_OFFLINE", "yes")
    assert not hub.offline() and hub.offline_reason(datasets=True) == "HF_DATASETS_OFFLINE=yes is set"


def test_frozen_huggingface_hub_offline_counts(clean_env):
    from huggingface_hub import constants

    clean_env.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "huggingface_hub is in offline mode" in hub.offline_reason()


def test_agrees_with_huggingface_hub_itself():
    """The installed huggingface_hub, imported under each environment, reaches the same verdict."""
    cases = [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "yes"}, {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"},
             {"TRANSFORMERS_OFFLINE": "on"}, {"HF_HUB_OFFLINE": "false"}, {}]
    code = "import huggingface_hub, kvgeom.hub as h; print(huggingface_hub.is_offline_mode(), h.offline())"
    for case in cases:
        env = {k: v for k, v in os.environ.items() if k not in VARS} | case
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        theirs, ours = out.stdout.split()
        assert theirs == ours, case


def test_offline_never_touches_the_network(clean_env):
    clean_env.setenv("HF_HUB_OFFLINE", "1")

    def boom(*a, **k):
        raise AssertionError("network used although offline")

    clean_env.setattr(hub.urllib.request, "urlopen", boom)
    assert hub.hub_problem() == "HF_HUB_OFFLINE=1 is set"
    assert not hub.hub_reachable()


def test_unreachable_endpoint_fails_fast(clean_env):
    clean_env.setenv("HF_ENDPOINT", "http://unreachable.invalid")
    start = time.monotonic()
    problem = hub.hub_problem(timeout=3.0)
    assert problem is not None and "unreachable.invalid is unreachable" in problem
    assert not hub.hub_reachable()
    assert time.monotonic() - start < 15


def test_any_http_answer_means_reachable(clean_env):
    import urllib.error

    def answer(*a, **k):
        raise urllib.error.HTTPError("https://huggingface.co", 405, "Method Not Allowed", {}, None)

    clean_env.setattr(hub.urllib.request, "urlopen", answer)
    assert hub.hub_problem() is None and hub.hub_reachable()
