"""What every HF-checkpoint format shares: config.json with a quantization_config, tokenizer, safetensors shards.

A format plans its tensors (what each stores and how many bytes), packs a quantized Linear into its own
named tensors, and reads a written folder back through ``FolderWeights``; this module writes the folder the
way ``save_pretrained`` lays it out and reads raw tensors from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors import safe_open

from quantfab.tasks.activations import InputQuant, MeasuredScales
from quantfab.tasks.modelio import ModelDir, TensorInfo, WeightIndex
from quantfab.tasks.lazy import lazy

torch = lazy("torch")
safetensors_torch = lazy("safetensors.torch")

SHARD_BYTES = 5 << 30  # save_pretrained's default max_shard_size
TOKENIZER_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")
DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}  # recipe name -> torch attribute
SOURCE_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # safetensors dtype -> torch attribute


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    shape: tuple[int, ...]
    grid: str | None  # None: stored as a float in ``dtype``
    dtype: torch.dtype  # the model's float dtype
    nbytes: int  # what it occupies in the checkpoint
    storage: str = ""  # which of its layouts a format stores this tensor in, where it has several
    input_scale: float | None = None  # the Linear's static input scale, where the format stores one (convert sets it)

    @property
    def type_name(self) -> str:
        return self.grid or str(self.dtype).removeprefix("torch.")


def model_dtype(config) -> torch.dtype:
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return name if isinstance(name, torch.dtype) else getattr(torch, DTYPES[str(name)])


def plan_tensors(config, tensors: dict[str, TensorInfo], grids: dict[str, str | None],
                 quantized_bytes: Callable[[tuple[int, ...], str, torch.dtype], int]) -> list[PlannedTensor]:
    """Every stored tensor: a tied head is stored once, as the embedding, like save_pretrained does. A tensor
    kept in float keeps the checkpoint's own float type (a bf16 tensor stays bf16 under a float32 config)."""
    model = model_dtype(config)
    out = []
    for name in sorted(tensors):
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        shape, grid = tensors[name].shape, grids.get(name.removesuffix(".weight"))
        source = SOURCE_FLOATS.get(tensors[name].dtype)
        dtype = model if grid or source is None else getattr(torch, source)
        nbytes = quantized_bytes(shape, grid, dtype) if grid else int(np.prod(shape)) * dtype.itemsize
        out.append(PlannedTensor(name, shape, grid, dtype, nbytes))
    return out


class HFFolderFormat:
    """What the HF-checkpoint formats share; each sets ``packed_bytes`` and defines grid_for, write, pack, reader
    and verify (decode a packed Linear from the written folder and compare it with the reconstruction)."""

    packed_bytes: Callable[[tuple[int, ...], str, torch.dtype], int]

    def output_name(self, options: Any, name: str) -> str:
        return f"{name}-{options.key}"

    def stores_codes(self, options: Any) -> bool:
        return True

    def ships_importance(self, options: Any) -> bool:
        """Whether the output ships llama.cpp's importance matrix beside it (GGUF's ``imatrix``)."""
        return False

    def measured_scales(self, options: Any) -> MeasuredScales:
        """The scales the output stores from the calibration tokens carried through the built layers: static input
        scales (ModuleReport.input_scale) and KV-cache scales (layer-file floats), chosen by quantize."""
        return MeasuredScales()

    def presets(self, options: Any, config, tensors: dict[str, TensorInfo]) -> dict[str, str | None]:
        """No per-tensor choice: every Linear takes the grid ``grid_for`` gives the recipe's request."""
        return {}

    def plan(self, options: Any, config, tensors: dict[str, TensorInfo], grids: dict[str, str | None],
             as_asked: bool = False) -> list[PlannedTensor]:
        """Every stored tensor (``as_asked`` changes nothing here: only the Linears' ``grids`` can fall back)."""
        return plan_tensors(config, tensors, grids, type(self).packed_bytes)

    def float_codes(self, t: PlannedTensor, load: Callable[[], np.ndarray]) -> None:
        """Floats a method left alone stay floats here (GGUF quantizes some itself)."""
        return None

    def float_tensor(self, t: PlannedTensor, w: np.ndarray) -> dict[str, torch.Tensor]:
        return {t.hf_name: torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(t.dtype)}


def write_folder(path: Path, model: ModelDir, quantization_config: dict[str, Any], planned: list[PlannedTensor],
                 tensor_data: Callable[[PlannedTensor], dict[str, torch.Tensor]], config_extra: dict[str, Any] | None = None,
                 file_format: str = "pt") -> None:
    """The folder: config.json with ``quantization_config`` (and ``config_extra``'s keys), the tokenizer files, the
    shards, whose metadata names ``file_format`` (mlx-lm writes "mlx", save_pretrained "pt")."""
    path.mkdir(parents=True)
    config = json.loads((model.path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config.update(config_extra or {})
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in TOKENIZER_FILES:
        if (model.path / f).is_file():
            shutil.copyfile(model.path / f, path / f)
    _write_shards(path, planned, tensor_data, file_format)


def _write_shards(path: Path, planned: list[PlannedTensor], tensor_data: Callable, file_format: str) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index past SHARD_BYTES."""
    shards: list[Path] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        shards.append(path / f"part-{len(shards) + 1}.safetensors")
        safetensors_torch.save_file(current, str(shards[-1]), metadata={"format": file_format})
        current.clear()

    for t in planned:
        data = tensor_data(t)
        nbytes = sum(v.numel() * v.element_size() for v in data.values())
        if current and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        current.update(data)
        size += nbytes
    flush()
    if len(shards) == 1:
        shards[0].rename(path / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, part in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        part.rename(path / final)
        with safe_open(str(path / final), framework="pt") as f:
            weight_map.update({k: final for k in f.keys()})
    total = sum((path / f).stat().st_size for f in set(weight_map.values()))
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


class FolderWeights:
    """A written folder's weights as float32 under HF names; ``decode`` turns a packed Linear into its weight."""

    def __init__(self, path: Path, packed_suffix: str, decode: Callable[[str, "FolderWeights"], torch.Tensor]):
        self.path = path
        self.inputs: dict[str, InputQuant] = {}  # module -> how the runtime quantizes its input (a format may fill it)
        self.kv_scales: dict[str, tuple[float, float]] = {}  # attention module -> its FP8 KV-cache (k, v) scales
        self.config = json.loads((path / "config.json").read_text())
        self.index = WeightIndex(sorted(path.glob("*.safetensors")), bool(self.config.get("tie_word_embeddings")))
        self.packed_suffix, self.decode = packed_suffix, decode

    def raw(self, name: str) -> torch.Tensor:
        """A stored tensor as written (packed integers stay integers)."""
        with safe_open(str(self.index.tensors[name].file), framework="pt") as f:
            return f.get_tensor(name)

    def scalar(self, name: str) -> float:
        """A stored one-element tensor (a static scale, [1] or []), as a Python float."""
        return float(self.raw(name).float().reshape(-1)[0])

    def kv_cache(self, prefix: str) -> dict[str, tuple[float, float]]:
        """The attention modules under ``prefix`` (names relative to it) whose KV cache the runtime quantizes."""
        return {m.removeprefix(prefix): s for m, s in self.kv_scales.items() if m.startswith(prefix)}

    def input_schemes(self, prefix: str) -> dict[str, InputQuant]:
        """How the runtime quantizes the inputs of the Linears under ``prefix`` (names relative to it)."""
        return {m.removeprefix(prefix): s for m, s in self.inputs.items() if m.startswith(prefix)}

    def has(self, name: str) -> bool:
        return name in self.index.tensors

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            stored = self.index.tensors[name].name if self.has(name) else name  # a tied head: the embedding
            module = stored.removesuffix(".weight")
            if stored.endswith(".weight") and self.has(f"{module}.{self.packed_suffix}"):
                out[name] = self.decode(module, self).float()
            else:
                out[name] = self.index.load([name])[name]
        return out
