"""The recipe schema: the single source of truth for what a build is (schema, docs, errors)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.quantize import METHODS, PLANNED_METHODS
from quantfab.tasks.validate import GATES

MethodName = Literal[tuple(METHODS) + tuple(PLANNED_METHODS)]  # type: ignore[valid-type]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class Section(BaseModel):
    """Every recipe section refuses keys it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    source: str = Field(description="fsspec URL of the model: a local path, file://, memory://, http(s)://, "
                        "s3://, hf://org/name, or synthetic://llama?layers=2&hidden=256 for a generated Llama.")
    revision: str | None = Field(None, description="Branch, tag or commit (hf://); recorded in the manifest.")
    include: list[str] = Field(
        default=["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"],
        description="Glob patterns of the files to fetch.")
    allow_pickle: bool = Field(False, description="Permit .bin/.pt checkpoints (they run code when loaded).")


class CalibrationSpec(Section):
    source: str = Field(description="URL of a .txt or .jsonl file, or synthetic://tokens for random token ids.")
    text_field: str = Field("text", description="The field holding the text in each .jsonl line.")
    samples: int = Field(64, ge=1, le=100_000, description="Number of calibration sequences.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per sequence, BOS included.")
    seed: int = Field(0, ge=0, description="Seed for choosing the sequences.")


class ModuleOverride(Section):
    method: MethodName | None = None  # type: ignore[valid-type]
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = Field(None, ge=1)
    symmetric: bool | None = None


class QuantizeSpec(Section):
    method: MethodName = Field(description="rtn: round to nearest with the grid's reference rule. "  # type: ignore[valid-type]
                               "group: group-wise with an activation-weighted clipping search. "
                               "nf4, gptq, awq: accepted by plan, not runnable yet.")
    bits: int | None = Field(None, ge=2, le=8, description="Code width; empty means the output type's.")
    group_size: int | None = Field(None, ge=1, description="Elements per scale along the input dimension; "
                                   "empty means the output type's block.")
    symmetric: bool | None = Field(None, description="Symmetric codes (no zero/min); empty means the output type's.")
    ignore: list[str] = Field(default=["lm_head"], description="Globs of Linear names kept in float.")
    overrides: dict[str, ModuleOverride] = Field(default_factory=dict,
                                                 description="Per-module settings by glob, e.g. '*.mlp.down_proj': {bits: 8}.")


def _output_union() -> Any:
    options = tuple(fmt.options for fmt in FORMATS.values())
    if len(options) == 1:
        return options[0]
    return Annotated[Union[options], Field(discriminator="format")]  # noqa: UP007


OutputSpec = _output_union()


class GatesSpec(Section):
    max_ppl_increase: float | None = Field(None, ge=0, description="Largest allowed relative PPL rise (0.05 = 5 %).")
    max_kl: float | None = Field(None, ge=0, description="Largest allowed mean KL(fp32 || quantized), nats per token.")
    min_top1: float | None = Field(None, ge=0, le=1, description="Smallest allowed top-1 agreement with fp32.")


class ValidateSpec(Section):
    source: str = Field(description="URL of the evaluation text (.txt/.jsonl) or synthetic://tokens.")
    text_field: str = "text"
    tokens: int = Field(8192, ge=16, le=10_000_000, description="Token budget of the evaluation.")
    window: int = Field(256, ge=8, le=131_072, description="Non-overlapping window length, BOS included.")
    metrics: list[Literal["perplexity", "kl_divergence", "top1_agreement"]] = Field(
        default=["perplexity", "kl_divergence", "top1_agreement"], min_length=1)
    gates: GatesSpec = Field(default_factory=GatesSpec)

    @field_validator("gates", mode="after")
    @classmethod
    def _gated_metrics_are_measured(cls, gates: GatesSpec, info) -> GatesSpec:
        metrics = info.data.get("metrics", [])
        for gate, (metric, _) in GATES.items():
            if getattr(gates, gate) is not None and metric not in metrics:
                raise ValueError(f"gate {gate} needs metric {metric} in validate.metrics")
        return gates


class PackageSpec(Section):
    destination: str = Field(description="fsspec URL of the folder the package is published to.")


class ExecutionSpec(Section):
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto takes CUDA when present.")


class Recipe(Section):
    """A quantized build: which model, how to calibrate and quantize it, what to ship and how to gate it."""

    extends: str | None = Field(None, description="A base recipe (path relative to this file) whose fields this one overrides.")
    name: str = Field(pattern=NAME_PATTERN, description="Lower-case name; used in deployment and package names.")
    description: str = ""
    model: ModelSpec
    calibration: CalibrationSpec
    quantize: QuantizeSpec
    outputs: list[OutputSpec] = Field(min_length=1, description="Formats to build, e.g. [{gguf: Q4_0}, {gguf: Q8_0}].")  # type: ignore[valid-type]
    validate_: ValidateSpec = Field(alias="validate")
    package: PackageSpec
    execution: ExecutionSpec = Field(default_factory=ExecutionSpec)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("outputs", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`{gguf: Q4_0}` is short for `{format: gguf, type: Q4_0}`."""
        if not isinstance(value, list):
            return value
        return [{"format": next(iter(v)), "type": next(iter(v.values()))}
                if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in FORMATS else v for v in value]

    @field_validator("outputs", mode="after")
    @classmethod
    def _unique_outputs(cls, outputs: list) -> list:
        keys = [o.key for o in outputs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"outputs lists {', '.join(dupes)} more than once")
        return outputs

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON data, for cache keys and manifests."""
        key = "validate_" if name == "validate" else name
        value = getattr(self, key)
        if isinstance(value, list):
            return {"items": [v.model_dump(mode="json") for v in value]}
        return value.model_dump(mode="json")
