"""The recipe schema: the single source of truth for what a build is (schema, docs, errors)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from quantfab.tasks.convert import FORMATS
from quantfab.tasks.quantize import METHODS
from quantfab.tasks.quantize.assign import budget_of, request
from quantfab.tasks.gates import GATES, TASK_GATES

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]{1,256}$")


def _glob(kind: str, example: str) -> Any:
    """A glob over names (dotted module names, or file names in the model folder): no path, no '..'."""
    def check(value: str) -> str:
        if not GLOB_CHARS.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a {kind} glob: use letters, digits, '_', '.', '-' and the wildcards "
                             f"'*', '?', '[...]', without '/' or '..' (e.g. {example!r})")
        return value
    return Annotated[str, AfterValidator(check)]


ModuleGlob = _glob("module-name", "*.mlp.down_proj")
FileGlob = _glob("file-name", "*.safetensors")


class Section(BaseModel):
    """Every recipe section refuses keys it does not know."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Section):
    source: str = Field(description="fsspec URL of the model: a local path, file://, memory://, http(s)://, "
                        "s3://, hf://org/name, or synthetic://llama?layers=2&hidden=256 for a generated Llama.")
    revision: str | None = Field(None, description="Branch, tag or commit (hf://); recorded in the manifest.")
    include: list[FileGlob] = Field(
        default=["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "README.md"],
        description="Glob patterns of the files to fetch (the source's README.md only for its license, which the "
                    "package's model card carries over; no stage but package reads it).")
    allow_pickle: bool = Field(False, description="Permit .bin/.pt checkpoints (they run code when loaded).")
    sha256: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(default_factory=dict, description="Expected sha256 of source files, by file "
                                   "name: a file whose bytes differ is fetched again, then refused (hf:// sources "
                                   "are checked against the hub's LFS digests anyway).")
    track: Literal["latest"] | None = Field(None, description="latest: the watch flow rebuilds this recipe when the "
                                            "source publishes a new revision (hf:// commit; elsewhere a digest of the "
                                            "config, index and weight files' sizes and etags or mtimes).")


class ExpertsSpec(Section):
    min_tokens: int = Field(128, ge=0, description="An expert of a mixture of experts routed fewer calibration tokens "
                            "than this gets the fallback; the build report lists every such expert.")
    fallback: Literal["all_tokens", "rtn"] = Field("all_tokens", description="all_tokens: calibrate the expert on "
                                                   "every token its layer saw, as if all were routed to it (as "
                                                   "llm-compressor's all-experts calibration). rtn: round it to nearest.")


class CalibrationSpec(Section):
    source: str = Field(description="URL of a .txt or .jsonl file, or synthetic://tokens for random token ids.")
    text_field: str = Field("text", description="The field holding the text in each .jsonl line.")
    samples: int = Field(64, ge=1, le=100_000, description="Number of calibration sequences.")
    seq_len: int = Field(256, ge=8, le=131_072, description="Tokens per sequence, BOS included.")
    seed: int = Field(0, ge=0, description="Seed for choosing the sequences.")
    experts: ExpertsSpec = Field(default_factory=ExpertsSpec, description="Mixtures of experts: each expert is "
                                 "calibrated on the tokens the router sends it; what to do when those are few.")


class ModuleOverride(Section):
    method: MethodName | None = None  # type: ignore[valid-type]
    bits: int | None = Field(None, ge=2, le=8)
    group_size: int | None = Field(None, ge=1)
    symmetric: bool | None = None


class GPTQSpec(Section):
    damp_percent: float = Field(0.01, gt=0, le=1, description="Dampening added to H's diagonal, as a fraction of its "
                                "mean; raised tenfold (up to 4 times) if the Cholesky factorisation fails.")
    block_size: int = Field(128, ge=1, le=65536, description="Columns per lazy-batch update block.")
    act_order: bool = Field(True, description="Process columns by descending H diagonal (desc_act). Groups stay "
                            "contiguous in the original order, so every format can store them. On by default: on "
                            "TinyStories INT4 g32 asymmetric it measured KL 0.0305 against 0.0336 without.")
    static_groups: bool = Field(False, description="Take every group's scale from the original weights up front "
                                "instead of when the group's first column is reached.")
    clip: bool = Field(True, description="Choose each group's scale by a range-shrink search (the group's squared "
                       "error weighted by H's diagonal) instead of its min/max, when the group is reached. On by "
                       "default: on TinyStories INT4 it measured KL 0.0379 against 0.0428 without at g32 symmetric, "
                       "0.0515 against 0.0615 at g128 symmetric, 0.0451 against 0.0465 at g128 asymmetric, and "
                       "0.0309 against 0.0300 at g32 asymmetric, the one scheme it costs.")
    max_shrink: float = Field(0.2, ge=0, lt=1, description="Largest fraction the clipping search shrinks a group's range by.")
    clip_points: int = Field(20, ge=1, le=1000, description="Shrink ratios tried between 1 and 1 - max_shrink.")


class AWQSpec(Section):
    grid_points: int = Field(20, ge=1, le=1000, description="Values of alpha in [0, 1) tried for s = mean|x|^alpha.")
    clip: bool = Field(True, description="Search a per-block range shrink after scaling (not for q/k, as AutoAWQ).")
    max_shrink: float = Field(0.5, ge=0, lt=1, description="Largest fraction the clipping search shrinks a block's range by.")
    clip_points: int = Field(20, ge=1, le=1000, description="Shrink ratios tried between 1 and 1 - max_shrink.")


class NF4Spec(Section):
    double_quant: bool = Field(False, description="Quantize the absmax values too (8-bit, blocks of 256, minus "
                               "their mean), as bitsandbytes' compress_statistics does.")


class SmoothQuantSpec(Section):
    alpha: float = Field(0.5, ge=0, le=1, description="Migration strength: each input channel j is divided by "
                         "s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (the Linears' columns multiplied by it); 0 leaves "
                         "the inputs' range alone, 1 moves all of it into the weights.")


class QuantizeSpec(Section):
    method: MethodName = Field(description="rtn: round to nearest with the grid's reference rule. "  # type: ignore[valid-type]
                               "group: group-wise with an activation-weighted clipping search. "
                               "nf4: bitsandbytes' NormalFloat-4 codebook, absmax per block (64 by default). "
                               "gptq: Hessian-based error feedback, layer-sequential on the quantized model's inputs. "
                               "awq: activation-aware scales folded into the preceding op, then a clipping search.")
    bits: int | None = Field(None, ge=2, le=8, description="Code width; empty means the output type's.")
    group_size: int | None = Field(None, ge=1, description="Elements per scale along the input dimension; "
                                   "empty means the output type's block.")
    symmetric: bool | None = Field(None, description="Symmetric codes (no zero/min); empty means the output type's.")
    indivisible: Literal["refuse", "largest_group", "keep_float"] = Field(
        "refuse", description="When a group or block does not divide a Linear's row (its input dimension), e.g. group "
        "128 on hidden 576: refuse (at plan time, naming the Linears and the group sizes that would divide every row), "
        "largest_group (the largest power-of-two group that divides every quantized row and the format accepts, for "
        "the whole output), or keep_float (those Linears stay in the source's float type). Every such difference is "
        "reported with its reason.")
    ignore: list[ModuleGlob] = Field(default_factory=list, description="Globs of decoder-layer Linear names kept in float. "
                              "No method quantizes the embedding or the output head; HF formats keep them in "
                              "float and GGUF file types round them to nearest as llama-quantize does.")
    overrides: dict[ModuleGlob, ModuleOverride] = Field(default_factory=dict,
                                                 description="Per-module settings by glob, e.g. '*.mlp.down_proj': {bits: 8}.")
    module_report: bool = Field(False, description="Also for rtn and nf4: each Linear's relative output error on the "
        "calibration inputs (run table, quality.json). group, awq and gptq fit to those inputs and always report it; "
        "rtn and nf4 quantize from the weights alone, so for them it costs a calibration pass over the unquantized "
        "model and a Hessian product per Linear, and runs only when this is true.")
    gptq: GPTQSpec = Field(default_factory=GPTQSpec, description="Options of method gptq.")
    awq: AWQSpec = Field(default_factory=AWQSpec, description="Options of method awq.")
    nf4: NF4Spec = Field(default_factory=NF4Spec, description="Options of method nf4.")
    smoothquant: SmoothQuantSpec | None = Field(None, description="SmoothQuant before the method, for outputs that "
        "quantize activations (W8A8): where a norm produces a group's input, a per-channel scale moves the input's "
        "outliers into the weights (folded into the norm: the float model is unchanged, no op is added at inference). "
        "Scales come from the unquantized model's calibration statistics. Not with awq, which scales those inputs "
        "itself.")

    @model_validator(mode="after")
    def _smoothquant_is_not_awq(self) -> "QuantizeSpec":
        methods = {self.method} | {o.method for o in self.overrides.values() if o.method}
        if self.smoothquant is not None and "awq" in methods:
            raise ValueError("smoothquant and method awq both scale the inputs norms produce: choose one (awq fits "
                             "its scales to weight-only quantization, smoothquant to quantized activations)")
        return self


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
    max_bits_per_weight: float | None = Field(None, gt=0, description="Largest allowed size of each output file, in "
                                              "bits per model parameter (what the report's bits/weight column shows).")
    max_accuracy_drop: float | None = Field(None, ge=0, le=1, description="Largest allowed drop of each "
        "multiple_choice task's accuracy (the task's score) below the unquantized model's on the same items, as a "
        "fraction (0.02 = 2 points); its standard error is the paired one over the items.")
    min_exact_match: float | None = Field(None, ge=0, le=1, description="Smallest allowed share of each continuation "
        "task's prompts whose greedy continuation equals the unquantized model's, token for token.")
    max_regression: float | None = Field(None, ge=0, description="Largest allowed relative rise of an output's KL "
        "against the package published at the destination (the last build), beyond the two evaluations' noise (1.96 "
        "standard errors of the difference): package refuses to replace a better build, and an output the last one "
        "had must still be built. `quantfab compare OLD NEW` applies the same rule to any two packages.")
    judge_by: Literal["estimate", "interval"] = Field("estimate", description="What a quality gate compares with its "
        "limit. estimate: the measured mean itself (a figure within noise of the limit passes or fails by chance). "
        "interval: its 95 % interval (± 1.96 standard errors over the evaluation tokens): the gate fails only when "
        "all of it lies past the limit, so only an output worse beyond the evaluation's noise fails. The report "
        "shows each figure's standard error and each gate's interval either way.")

    def limits(self) -> dict[str, float]:
        """The gates set, by name, with their limits."""
        return {k: v for k, v in self.model_dump().items() if k != "judge_by" and v is not None}


class EvalTaskSpec(Section):
    source: str = Field(description="URL of a JSONL task file, one item per line. multiple_choice: "
        '{"context": str, "choices": [str, ...], "gold": index}; continuation: {"prompt": str}.')
    kind: Literal["multiple_choice", "continuation"] = Field(description="multiple_choice: each choice's "
        "log-likelihood after the context, as lm-evaluation-harness scores such tasks (accuracy, and accuracy_norm "
        "per character of the choice). continuation: the greedy continuation of each prompt against the unquantized "
        "model's (exact_match, and the mean position of the first differing token).")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="The task's name in the report and gates; "
                             "empty: the file's name without its extension.")
    items: int | None = Field(None, ge=1, description="Score the file's first N items only; empty: all.")
    delimiter: str = Field(" ", description="multiple_choice: what goes between the context and each choice "
                           "(lm-eval's target_delimiter).")
    score: Literal["accuracy", "accuracy_norm"] = Field("accuracy_norm", description="multiple_choice: the accuracy "
        "gate max_accuracy_drop reads: accuracy (the choice of highest log-likelihood) or accuracy_norm (highest "
        "log-likelihood per character of the delimited choice, lm-eval's acc_norm). Both are reported.")
    new_tokens: int = Field(32, ge=1, le=4096, description="continuation: greedy tokens compared per prompt (no "
                            "stop at EOS). The unquantized model runs once per token, over every prompt.")

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> "EvalTaskSpec":
        other = {"multiple_choice": {"new_tokens"}, "continuation": {"delimiter", "score"}}[self.kind]
        wrong = sorted(other & self.model_fields_set)
        if wrong:
            raise ValueError(f"{', '.join(wrong)} {'does' if len(wrong) == 1 else 'do'} not apply to kind {self.kind}")
        return self

    @property
    def label(self) -> str:
        """The task's name: ``name``, else the file's name without its extension."""
        return self.name or PurePosixPath(self.source.rstrip("/")).name.split(".")[0]


class SpeedSpec(Section):
    prompt_tokens: int = Field(512, ge=1, le=131_072, description="pp: prompt tokens processed in one batch.")
    generated_tokens: int = Field(128, ge=1, le=131_072, description="tg: tokens generated one at a time.")
    repetitions: int = Field(3, ge=1, le=100, description="Runs of each test; the report gives their mean and "
                             "standard deviation.")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads; empty: llama-bench's default.")
    repack: bool = Field(True, description="Let llama.cpp repack weights for the CPU's fastest kernels (its "
                         "default); a file on which llama-bench dies by a signal with it is measured again without.")
    reference: bool = Field(True, description="Also measure the unquantized model as an F16 GGUF, written for it "
                            "(2 bytes per parameter in the store).")


class ValidateSpec(Section):
    source: str = Field(description="URL of the evaluation text (.txt/.jsonl) or synthetic://tokens.")
    text_field: str = "text"
    tokens: int = Field(8192, ge=16, le=10_000_000, description="Token budget of the evaluation.")
    window: int = Field(256, ge=8, le=131_072, description="Non-overlapping window length, BOS included.")
    metrics: list[Literal["perplexity", "kl_divergence", "top1_agreement"]] = Field(
        default=["perplexity", "kl_divergence", "top1_agreement"], min_length=1)
    tasks: list[EvalTaskSpec] = Field(default_factory=list, description="Task evals on your own items (JSONL), "
        "scored for the unquantized model and every output on the same items; gates max_accuracy_drop and "
        "min_exact_match read them. Needs the model's tokenizer.")
    speed: SpeedSpec | None = Field(None, description="Speed beside quality: llama.cpp's llama-bench on each GGUF "
        "output (and an F16 reference), prompt processing and generation tokens/s on the machine validate runs on, "
        "where llama-bench is installed ($QUANTFAB_LLAMA_CPP_TOOLS or PATH) and the build has a GGUF output; "
        "elsewhere the report says why it was not measured. {} takes the defaults.")
    gates: GatesSpec = Field(default_factory=GatesSpec)

    @model_validator(mode="after")
    def _tasks_are_named_once_and_gated_tasks_exist(self) -> "ValidateSpec":
        labels = [t.label for t in self.tasks]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"validate.tasks names {', '.join(dupes)} more than once: give each a distinct name")
        kinds = {t.kind for t in self.tasks}
        for gate, (kind, _) in TASK_GATES.items():
            if getattr(self.gates, gate) is not None and kind not in kinds:
                raise ValueError(f"gate {gate} needs a task of kind {kind} in validate.tasks")
        return self

    @field_validator("gates", mode="after")
    @classmethod
    def _gated_metrics_are_measured(cls, gates: GatesSpec, info) -> GatesSpec:
        metrics = info.data.get("metrics", [])
        for gate, (metric, _) in {**GATES, "max_regression": ("kl_divergence", "")}.items():
            if getattr(gates, gate) is not None and metric not in metrics:
                raise ValueError(f"gate {gate} needs metric {metric} in validate.metrics")
        return gates


class PackageSpec(Section):
    destination: str = Field(description="fsspec URL of the folder the package is published to.")


class ExecutionSpec(Section):
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description=(
        "Where calibration, the forward passes and the methods' matrix work run (GPTQ's factorisation and "
        "updates, AWQ's error search, the error report); the grids' rounding stays on the CPU. auto takes CUDA "
        "when present."))
    runner: Literal["local", "dask"] = Field("local", description="dask: every stage runs on prefect-dask's "
                                             "DaskTaskRunner and spreads its independent work over the cluster "
                                             "(per-file download, per-layer quantize of non-sequential methods, "
                                             "per-output convert); the results are the same bytes as local's.")
    dask_address: str | None = Field(None, description="Address of a running Dask scheduler (tcp://host:8786); "
                                     "empty: a LocalCluster of dask_workers processes. The store must be reachable "
                                     "from every worker (a shared path or an fsspec URL).")
    dask_workers: int = Field(2, ge=1, le=1024, description="Worker processes of the LocalCluster (one thread each).")


class Recipe(Section):
    """A quantized build: which model, how to calibrate and quantize it, what to ship and how to gate it."""

    extends: str | None = Field(None, description="A base recipe (path relative to this file) whose fields this one "
                                "overrides; it must lie inside the project (the nearest folder above holding .git, "
                                "prefect.yaml or pyproject.toml).")
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
                if isinstance(v, dict) and len(v) == 1 and "format" not in v and not isinstance(next(iter(v.values())), (dict, list))
                else v for v in value]

    @field_validator("outputs", mode="after")
    @classmethod
    def _unique_outputs(cls, outputs: list) -> list:
        keys = [o.key for o in outputs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"outputs lists {', '.join(dupes)} more than once")
        return outputs

    @model_validator(mode="after")
    def _tasks_have_a_tokenizer(self) -> "Recipe":
        if self.validate_.tasks and self.model.source.startswith("synthetic://"):
            raise ValueError("validate.tasks are text, read with the model's tokenizer, and a synthetic:// model has "
                             "none: evaluate a model with a tokenizer.json")
        return self

    @model_validator(mode="after")
    def _outputs_hold_the_grids(self) -> "Recipe":
        """Every output can store what quantize asks for, globally and in each override."""
        q = self.quantize
        asks = {"quantize": (q.method, q.bits, q.group_size, q.symmetric)}
        for pattern, o in q.overrides.items():
            asks[f"quantize.overrides[{pattern!r}]"] = (o.method or q.method, q.bits if o.bits is None else o.bits,
                                                        q.group_size if o.group_size is None else o.group_size,
                                                        q.symmetric if o.symmetric is None else o.symmetric)
        for i, o in enumerate(self.outputs):
            if budget_of(o):
                fixed = [f"quantize.{k}" for k in ("bits", "group_size", "symmetric") if getattr(q, k) is not None]
                if fixed or "nf4" in {m for m, *_ in asks.values()}:
                    raise ValueError(f"outputs[{i}]: {o.key} has target_bits_per_weight, which picks each Linear's "
                                     f"type, and {', '.join(fixed) or 'method nf4'} would fix it: drop "
                                     f"{'them' if len(fixed) > 1 else 'it'} (quantize.overrides can pin chosen Linears)")
            for where, (method, bits, group_size, symmetric) in asks.items():
                if method == "awq" and FORMATS[o.format].measured_scales(o):
                    raise ValueError(f"outputs[{i}]: {o.key} has static activation or KV-cache scales, measured on the "
                                     f"inputs the built layers get, and {where}.method awq rescales those inputs: use "
                                     "rtn or gptq (with quantize.smoothquant against outliers)")
                try:
                    FORMATS[o.format].grid_for(o, request(method, bits, group_size, symmetric, q))
                except ValueError as exc:
                    raise ValueError(f"outputs[{i}]: {o.key} cannot store {where}.method {method}"
                                     f"{_asked(bits, group_size, symmetric)}: {exc}") from None
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain JSON data, for cache keys and manifests."""
        key = "validate_" if name == "validate" else name
        value = getattr(self, key)
        if isinstance(value, list):
            return {"items": [v.model_dump(mode="json") for v in value]}
        return value.model_dump(mode="json")


def _asked(bits: int | None, group_size: int | None, symmetric: bool | None) -> str:
    parts = [f"{k}={v}" for k, v in (("bits", bits), ("group_size", group_size), ("symmetric", symmetric)) if v is not None]
    return f" with {', '.join(parts)}" if parts else ""
