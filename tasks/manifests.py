"""The small typed records stages hand each other: blob references and key facts, never tensors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from quantfab.tasks.store import Blob, Store


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    def named_blobs(self) -> dict[str, Blob]:
        """Every blob this record refers to, by where it sits in the record (``files/config.json``,
        ``layers/3``), so a cache hit can be checked against the store and a problem named."""
        found: dict[str, Blob] = {}

        def walk(value: object, at: str) -> None:
            if isinstance(value, Blob):
                found[at] = value
            elif isinstance(value, BaseModel):
                for field in type(value).model_fields:
                    walk(getattr(value, field), f"{at}/{field}")
            elif isinstance(value, dict):
                for k, v in value.items():
                    walk(v, f"{at}/{k}")
            elif isinstance(value, (list, tuple)):
                for i, v in enumerate(value):
                    walk(v, f"{at}/{i}")

        walk(self, "")
        return {at.lstrip("/"): blob for at, blob in found.items()}

    def problems(self, store: Store, move_aside: bool = True) -> list[str]:
        """What keeps this cached record from being used: each blob missing or damaged (then moved aside)."""
        problems = []
        for at, blob in self.named_blobs().items():
            problem = store.check(blob, move_aside=move_aside)
            if problem:
                problems.append(f"{at} (sha256 {blob.digest}): {problem}")
        return problems


class ModelManifest(Manifest):
    source: str
    revision: str
    files: dict[str, Blob]  # file name -> blob (config, tokenizer, shards)
    model_type: str
    num_layers: int
    parameters: int


EXPERT_FALLBACK = "expert routed"  # how a module report's note of an expert's fallback begins


class ExpertFallback(BaseModel):
    """What statistics an expert routed fewer than ``min_tokens`` calibration tokens is quantized with."""

    min_tokens: int = 128
    fallback: Literal["all_tokens", "rtn"] = "all_tokens"


class CalibrationManifest(Manifest):
    tokens: Blob  # safetensors with "input_ids" (samples, seq_len)
    stats: list[Blob]  # one safetensors per decoder layer: {input}.hessian, .mean_abs, .max_abs, .count
    count: int  # calibration tokens
    experts: ExpertFallback = ExpertFallback()
    source: str = ""  # where the calibration text came from, redacted: an importance matrix names its dataset


class Allocation(BaseModel):
    """One output's types chosen under its size budget (tasks/quantize/allocate.py)."""

    target_bits_per_weight: float
    bits_per_weight: float  # what the chosen types make the tensors' bytes, per model parameter
    types: dict[str, str]  # Linear -> grid
    kl: float  # the KL against the float model the chosen types predict, summed over the Linears (nats per token)


class AllocationManifest(Manifest):
    outputs: dict[str, Allocation] = {}  # output key -> its allocation; outputs without a budget are absent


class ModuleReport(BaseModel):
    name: str
    grid: str | None  # None: kept in float
    method: str | None = None
    note: str = ""
    asked: str | None = None  # the grid asked for, where a fallback changed it
    fallback: str = ""  # why this module is not what the recipe asked (a fallback type, group or method)
    relative_output_error: float | None = None  # None: not measured (rtn and nf4 without quantize.module_report)
    input_scale: float | None = None  # the static scale of its input (outputs with static activation scales)


class QuantizedOutput(BaseModel):
    output: str  # the output key, e.g. gguf-Q4_0
    layers: list[Blob]  # per decoder layer: {linear}.codes / .d / .m
    modules: list[ModuleReport]


class QuantizeManifest(Manifest):
    method: str
    outputs: dict[str, QuantizedOutput]


WEIGHT_FILES = (".gguf", ".safetensors")  # what bits per weight counts; configs and tokenizers do not
SOURCE_CARD = "README.md"  # the source model's card, downloaded for its license (package carries it over)
IMATRIX_FILE = ".imatrix.gguf"  # nor llama.cpp's importance matrix shipped beside a GGUF file (its usual name)


def weight_bytes(files: dict[str, Blob]) -> int:
    return sum(b.size for name, b in files.items() if name.endswith(WEIGHT_FILES) and not name.endswith(IMATRIX_FILE))


class Mismatch(BaseModel):
    """A packed tensor whose stored bytes do not decode to the method's reconstruction."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    tensor: str
    count: int  # mismatching elements
    first_index: int  # flat (row-major) index of the first, in the HF weight's shape
    max_abs_error: float


class Verification(BaseModel):
    """Every packed tensor of one output decoded from the written file and compared with what was packed."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    backend: str  # where the kernels ran: cupy, cpu or numpy
    tensors: int
    elements: int
    max_abs_error: float
    mismatches: list[Mismatch]


class FormatFile(BaseModel):
    """One output as published: a single file (GGUF) or a folder of files (an HF checkpoint)."""

    output: str
    path: str  # the file or folder name in the package
    files: dict[str, Blob]  # path in the package -> blob, every file of this output
    tensor_types: dict[str, int]  # type name -> tensor count
    fallbacks: list[str]  # "tensor: why", every tensor that is not what the recipe asked
    bits_per_weight: float  # weight files' bytes x 8 / parameters
    nominal_bits_per_weight: float  # the same, as planned had nothing fallen back
    verification: Verification

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.files)


class ConvertManifest(Manifest):
    files: dict[str, FormatFile]


class QualityManifest(Manifest):
    report: Blob  # quality.json
    passed: bool
    table: str  # markdown
    failures: list[str]


class PackageManifest(BaseModel):
    destination: str
    manifest_sha256: str
    files: list[str]
    stamps: dict[str, str] = {}  # path -> size and modification time when published (the cheap check of a cache hit)
    comparison: str = ""  # with validate.gates.max_regression: the build against the package it replaced (markdown)
