"""Streaming access to a safetensors model: its config, tokenizer and weights, read per decoder layer.

Names, shapes and dtypes come from the safetensors headers alone; weights are read per decoder layer,
so peak memory is one layer plus the hidden states, whatever the depth of the model. The layers run in
tasks/decoder.py.
"""

from __future__ import annotations

import functools
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from quantfab.tasks.checkpoint_map import Placement, checkpoint_map, memory_shapes
from quantfab.tasks.errors import UserError
from quantfab.tasks.families import check_supported
from quantfab.tasks.model_structure import FrozenConfig, alias_tied_embeddings, frozen_config, layout, placements
from quantfab.tasks.lazy import lazy

torch = lazy("torch")

ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F64": 8, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1}
MAX_HEADER = 100 << 20
FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def read_safetensors_header(path: Path, header_only: bool = False) -> dict[str, TensorInfo]:
    """Parse one file's header, checking that every tensor's offsets lie inside the file.

    ``header_only``: the file holds just the header (plan reads no weights), so offsets are not checked
    against its length.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"{path.name}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise UserError(f"{path.name}: safetensors header length {n} exceeds the file ({size} bytes); truncated or corrupt")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path.name}: safetensors header is not valid JSON") from None
    out: dict[str, TensorInfo] = {}
    data_len = float("inf") if header_only else size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path.name}: tensor {name}: malformed safetensors header entry {meta!r:.120}") from None
        width = ST_DTYPES.get(dtype)
        if width is None:
            raise UserError(f"{path.name}: tensor {name} has unsupported dtype {dtype}")
        expected = width * (int(np.prod(shape)) if shape else 1)
        if end - start != expected or end > data_len or start < 0:
            raise UserError(f"{path.name}: tensor {name} offsets [{start}, {end}) do not fit dtype {dtype} "
                            f"shape {list(shape)} inside {data_len} data bytes; the file is truncated or corrupt")
        out[name] = TensorInfo(name, dtype, shape, path)
    return out


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in the model transformers builds from ``config`` (a tied head left out)."""
    if isinstance(config, FrozenConfig):
        return config.expected
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def check_against_config(config, tensors: dict[str, TensorInfo]) -> None:
    """Every parameter the config implies is present, floating point and of the shape the config implies
    (experts stored per expert are checked as transformers stacks them)."""
    expected = expected_shapes(config)
    for t in tensors.values():
        if t.dtype not in FLOAT_DTYPES:
            raise UserError(f"{t.file.name}: tensor {t.name} is {t.dtype}; weights must be F32, F16 or BF16")
    shapes = {n: t.shape for n, t in tensors.items()}
    found = memory_shapes(shapes, placements(config, shapes))
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"the safetensors files lack {', '.join(missing[:3])}{more}, which config.json implies")
    for name, shape in expected.items():
        got, first = found[name]
        t = tensors[first]
        if got != shape:
            what = f"tensor {name}" if name == t.name else f"tensor {name} (from {t.name} and its kin)"
            raise UserError(f"{t.file.name}: {what} has shape {list(got)}, but config.json implies {list(shape)}")


def read_headers(files: list[Path], header_only: bool = False) -> dict[str, TensorInfo]:
    """Every tensor's header across a checkpoint's shards (see read_safetensors_header)."""
    tensors: dict[str, TensorInfo] = {}
    for path in sorted(files):
        tensors.update(read_safetensors_header(path, header_only))
    return tensors


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or Inf, in one pass without a mask: the min and max are finite only then
    (a NaN propagates into both); 10x faster than counting, which a load of every weight pays."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


class WeightIndex:
    """Every tensor of a model (across shards), read lazily by name."""

    def __init__(self, files: list[Path], tied_embeddings: bool = False, layers_name: str = "model.layers",
                 model_type: str = "llama"):
        self.layers_name, self.model_type = layers_name, model_type
        self.tensors = read_headers(files)
        if tied_embeddings:
            alias_tied_embeddings(self.tensors)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in group:
                    tensor = f.get_tensor(self.tensors[name].name).to(torch.float32)
                    if tensor.numel() and not all_finite(tensor):
                        bad = int((~torch.isfinite(tensor)).sum())
                        raise UserError(f"{path.name}: tensor {self.tensors[name].name} holds {bad} NaN or Inf "
                                        "value(s); a model with non-finite weights cannot be quantized")
                    out[name] = tensor
        return out

    @functools.cached_property
    def placements(self) -> dict[str, Placement]:
        """Where each checkpoint tensor lives in the model transformers builds."""
        return checkpoint_map(self.model_type).placements({n: t.shape for n, t in self.tensors.items()})

    def checkpoint_names(self, names: list[str]) -> list[str]:
        """The checkpoint tensors holding parameters ``names`` of the model transformers builds."""
        wanted = set(names)
        return [n for n, p in self.placements.items() if p.name in wanted]

    def prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}."

    def layer_names(self, i: int) -> list[str]:
        prefix = self.prefix(i)
        return [n for n in self.tensors if n.startswith(prefix)]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Decoder layer ``i``'s tensors, named relative to the layer (what ``Decoder.layer`` takes)."""
        return relative(self.load(self.layer_names(i)), self.prefix(i))


@dataclass(frozen=True)
class ModelDir:
    """A local folder with config, tokenizer and safetensors shards of one model."""

    path: Path
    source: str | None = None  # the (redacted) source URL the folder came from, for messages that name it

    def config(self):
        from transformers import AutoConfig

        where = f"{self.source.rstrip('/')}/config.json" if self.source else str(self.path / "config.json")
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{where}: cannot read the model config: {exc}") from None
        check_supported(config, where)
        # soft-capped attention scores (Gemma 2) exist only in the eager implementation
        config._attn_implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
        return config

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not (self.path / "tokenizer.json").is_file():
            raise UserError(f"{self.path}: the model has no tokenizer.json (a fast tokenizer is required)")
        try:  # no remote code, and only the fast tokenizer's JSON: nothing here unpickles
            return AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False, use_fast=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path / 'tokenizer_config.json'}: cannot load the tokenizer: {exc}") from None

    def frozen(self, memo: Path) -> tuple[FrozenConfig, dict[str, TensorInfo]]:
        """The config frozen (tasks/model_structure.py, memoized in ``memo``) and the tensor headers, as
        ``weights()`` names them: without torch or transformers for a model seen before."""
        tensors = read_headers(self._safetensors())
        config = frozen_config(self, tensors, memo)
        if config.tie_word_embeddings:
            alias_tied_embeddings(tensors)
        return config, tensors

    def weights(self) -> WeightIndex:
        config = self.config()
        return WeightIndex(self._safetensors(), bool(getattr(config, "tie_word_embeddings", False)),
                           layout(config).layers_name, config.model_type)

    def _safetensors(self) -> list[Path]:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no .safetensors files")
        return files


CPU = "cpu"  # a device torch takes by name; a torch.device would import torch with this module


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("execution.device: cuda was asked for but no CUDA device is present")
    if setting == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def relative(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

