"""The seven stages as Prefect tasks: thin wrappers over the plain functions in quantfab.tasks.

A stage's cache key is ours (pipelines/keys.py), not Prefect's input hashing: Prefect stores and finds
the result record under it, and anything else can compute it without Prefect.
Each runs inside ``store.writing()`` (``_store_writing``): a full disk while it writes is a clear error, not a traceback.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from prefect import Task, task

from quantfab.pipelines.keys import cache_key
from quantfab.pipelines.recipe import CalibrationSpec, ModelSpec, QuantizeSpec, ValidateSpec
from quantfab.tasks import calibrate as calibrate_mod
from quantfab.tasks import download as download_mod
from quantfab.tasks import package as package_mod
from quantfab.tasks import validate as validate_mod
from quantfab.tasks.convert import stage as convert_mod
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import (AllocationManifest, CalibrationManifest, ConvertManifest, ExpertFallback,
                                      ModelManifest, PackageManifest, QualityManifest, QuantizeManifest)
from quantfab.tasks.quantize import allocate as allocate_mod
from quantfab.tasks.quantize import stage as quantize_mod
from quantfab.tasks.store import Store

def _task_key(context: Any, parameters: dict[str, Any]) -> str:
    return cache_key(context.task.name, parameters)


def _worth_retrying(task: Task, task_run: Any, state: Any) -> bool:
    """A user's mistake (a UserError: bad file, bad tensor) fails at once; other failures are retried."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:  # noqa: BLE001 - anything else (network, a killed worker) may pass on a retry
        return True
    return True


@contextmanager
def _store_writing(store_url: str) -> Iterator[Store]:
    """The run's store, where a full disk while the stage writes is a clear error (``Store.writing``)."""
    store = Store(store_url)
    with store.writing():
        yield store


def _stage(name: str, retries: int = 0):
    return task(name=name, cache_key_fn=_task_key, persist_result=True, result_serializer="json",
                retries=retries, retry_delay_seconds=[2, 8, 30][:retries] or 0, retry_condition_fn=_worth_retrying)


@_stage("download", retries=2)
def download(model: ModelSpec, store_url: str, code: str) -> ModelManifest:
    with _store_writing(store_url) as store:
        return download_mod.download(model.source, model.revision, model.include, model.allow_pickle, store,
                                     model.sha256)


@_stage("calibrate")
def calibrate(model: ModelManifest, calibration: CalibrationSpec, text_sha256: str | None, statistics: bool,
              diagonal: bool, device: str, store_url: str, code: str) -> CalibrationManifest:
    with _store_writing(store_url) as store:
        return calibrate_mod.calibrate(model, calibration.source, calibration.samples, calibration.seq_len, calibration.seed,
                                       calibration.text_field, device, store, statistics,
                                       ExpertFallback(**calibration.experts.model_dump()), diagonal, text_sha256)


@_stage("allocate")
def allocate(model: ModelManifest, calibration: CalibrationManifest, quantize: QuantizeSpec | None, outputs: list,
             device: str, store_url: str, code: str) -> AllocationManifest:
    with _store_writing(store_url) as store:
        return allocate_mod.allocate(model, calibration, quantize, outputs, device, store)


@_stage("quantize")
def quantize(model: ModelManifest, calibration: CalibrationManifest, allocation: AllocationManifest,
             quantize: QuantizeSpec, outputs: list, device: str, store_url: str, code: str) -> QuantizeManifest:
    with _store_writing(store_url) as store:
        return quantize_mod.quantize(model, calibration, quantize, outputs, device, store, allocation)


@_stage("convert")
def convert(model: ModelManifest, calibration: CalibrationManifest | None, quantized: QuantizeManifest, outputs: list, name: str,
            store_url: str, code: str) -> ConvertManifest:
    with _store_writing(store_url) as store:
        return convert_mod.convert(model, quantized, outputs, name, store, calibration)


@_stage("validate")
def validate(model: ModelManifest, converted: ConvertManifest, quantized: QuantizeManifest, outputs: list,
             validate: ValidateSpec, text_sha256: str | None, task_digests: dict[str, str], speed_tool: str | None,
             device: str, store_url: str, code: str) -> QualityManifest:
    with _store_writing(store_url) as store:
        return validate_mod.validate(model, converted, quantized, outputs, validate, task_digests, speed_tool, device,
                                     store, text_sha256)


@_stage("package")
def package(name: str, model: ModelManifest, calibration: CalibrationManifest, converted: ConvertManifest,
            quality: QualityManifest, recipe_yaml: str, recipe_digest: str, destination: str, version: str,
            max_regression: float | None, store_url: str, code: str) -> PackageManifest:
    with _store_writing(store_url) as store:
        return package_mod.package(name, model, converted, quality, recipe_yaml, recipe_digest, destination, version,
                                   store, calibration, max_regression)


STAGES: dict[str, Task] = {t.name: t for t in (download, calibrate, allocate, quantize, convert, validate, package)}
