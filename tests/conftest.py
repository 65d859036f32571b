"""Shared fixtures: where the real data lives, and an isolated Prefect home for flow tests.

Prefect reads its settings when first imported, so they are set here, before any test module imports it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest

if TYPE_CHECKING:
    import torch

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


@dataclass(frozen=True)
class Built:
    model: Any  # ModelManifest
    calibration: Any  # CalibrationManifest
    quantized: Any  # QuantizeManifest
    converted: Any  # ConvertManifest


def run_stages(recipe: Any, store: Any) -> Built:
    """download -> calibrate -> quantize -> convert of ``recipe`` on the CPU, through the stage functions."""
    from quantfab.tasks import calibrate as calibrate_mod
    from quantfab.tasks import download as download_mod
    from quantfab.tasks.convert.stage import convert
    from quantfab.tasks.manifests import ExpertFallback
    from quantfab.tasks.quantize.stage import quantize

    model = download_mod.download(recipe.model.source, None, recipe.model.include, False, store)
    cal = calibrate_mod.calibrate(model, recipe.calibration.source, recipe.calibration.samples,
                                  recipe.calibration.seq_len, recipe.calibration.seed, recipe.calibration.text_field,
                                  "cpu", store, True, ExpertFallback(**recipe.calibration.experts.model_dump()))
    quantized = quantize(model, cal, recipe.quantize, recipe.outputs, "cpu", store)
    return Built(model, cal, quantized, convert(model, quantized, recipe.outputs, recipe.name, store, cal))


@pytest.fixture(scope="session")
def stages() -> Callable[[Any, Any], Built]:
    """``run_stages``, for test modules (conftest is not importable under --import-mode=importlib)."""
    return run_stages


def bfloat16_weights_run_in_float32(model: torch.nn.Module, key: str) -> torch.nn.Module:
    """compressed-tensors 0.20 decompresses FP4 weights to bfloat16 whatever the model's dtype, and a float32
    model's matmul then refuses them (transformers 5.25 too): for an FP4 output ``key``, cast each Linear's weight
    to float32 as it runs, after the decompression (exact: a bfloat16 value is a float32 value)."""
    import torch

    def cast(module: torch.nn.Module, args: tuple) -> None:
        if module.weight.dtype == torch.bfloat16:
            module.weight.data = module.weight.data.float()

    if "fp4" in key:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(cast)
    return model


@pytest.fixture(scope="session")
def fp4_runs_in_float32() -> Callable[[torch.nn.Module, str], torch.nn.Module]:
    """``bfloat16_weights_run_in_float32``, for test modules."""
    return bfloat16_weights_run_in_float32


class Damage:
    """Ways stored and published files get damaged: a stray write, and bit rot (the bytes change, the
    store's stamp record still vouches for them), and a process that forgets what it hashed."""

    @staticmethod
    def flip(path: Path, at: int | None = None) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2 if at is None else at] ^= 0x01
        path.write_bytes(bytes(data))

    @staticmethod
    def rot(store: Any, digest: str) -> Path:
        import fsspec

        from quantfab.tasks.store import file_stamp

        path = Path(store._key(digest))
        Damage.flip(path)
        Path(store.verified_path(digest)).write_text(file_stamp(fsspec.filesystem("file"), str(path), identity=True)[1])
        return path

    @staticmethod
    def forget_hashes() -> None:
        """As a new process: no memory of blobs hashed whole before."""
        from quantfab.tasks import store as store_mod

        store_mod._VERIFIED.clear()


@pytest.fixture(scope="session")
def damage() -> type[Damage]:
    return Damage
