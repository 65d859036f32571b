"""Shared fixtures: where the real data lives, and an isolated Prefect home for flow tests.

Prefect reads its settings when first imported, so they are set here, before any test module imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("QUANTFAB_DATA", REPO.parent / "shared" / "data")).resolve()
TINY = DATA / "tinystories-656k"
PREFECT_ENV = {
    "PREFECT_HOME": tempfile.mkdtemp(prefix="quantfab-prefect-home-"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
    "QUANTFAB_DATA": str(DATA),
    "HF_HUB_OFFLINE": "1",
    # The ephemeral API's polling loops (schedules, late runs, workers...) wake every few seconds and
    # serve nothing a test runs; on a 2-core CI machine they compete with the test itself.
    **{f"PREFECT_SERVER_SERVICES_{s}_ENABLED": "false" for s in (
        "CANCELLATION_CLEANUP", "FOREMAN", "LATE_RUNS", "SCHEDULER", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
        "CLEANUP_RECONCILER", "TRIGGERS")},
}
os.environ.update(PREFECT_ENV)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder; tests that need it skip, saying why, where it is absent."""
    if not (TINY / "model.safetensors").is_file():
        pytest.skip(f"TinyStories-656K not found at {TINY} (set QUANTFAB_DATA to the shared data folder)")
    return DATA


@pytest.fixture(scope="session")
def prefect_env() -> dict[str, str]:
    """The environment a subprocess needs to share this session's Prefect settings."""
    return dict(PREFECT_ENV)
