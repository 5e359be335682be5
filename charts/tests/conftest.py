"""Shared fixtures of the chart tests. Missing dependencies fail loudly instead of skipping."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

_REQUIRED = {
    "helm_python": "helm-python-sdk",
    "kubernetes_validate": "kubernetes-validate",
    "jsonschema": "kubernetes-validate (dependency jsonschema)",
    "yaml": "pyyaml",
}
_missing = []
for _module, _package in _REQUIRED.items():
    try:
        importlib.import_module(_module)
    except ImportError:
        _missing.append(_package)
if _missing:
    raise ImportError(
        "the chart tests need the Python packages "
        + ", ".join(_missing)
        + ": run `pip install -r charts/tests/requirements.txt`"
    )

import render  # noqa: E402
import spegel_flags  # noqa: E402


@pytest.fixture(scope="session")
def default_manifests():
    """Manifests rendered with the chart's default values."""
    return render.render()


@pytest.fixture(scope="session")
def all_manifests():
    """Manifests rendered with values-all.yaml (every option on) and the VPA API available."""
    return render.render_all()


@pytest.fixture(scope="session")
def cli():
    """Flags the spegel binary accepts, read from spegel/src/config.rs."""
    return spegel_flags.parse_config_rs()
