"""Streaming access to a safetensors model, and a Llama-family decoder run one layer at a time.

Names, shapes and dtypes come from the safetensors headers alone; weights are read per decoder layer,
so peak memory is one layer plus the hidden states, whatever the depth of the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open

from quantfab.tasks.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same input share one set of calibration statistics.
INPUT_OF = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
            "self_attn.o_proj": "o_in", "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}
ST_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
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


def check_against_config(config, tensors: dict[str, TensorInfo]) -> None:
    """Every parameter the config implies is present, floating point and of the shape the config implies."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"the safetensors files lack {', '.join(missing[:3])}{more}, which config.json implies")
    for name, shape in expected.items():
        t = tensors[name]
        if t.dtype not in FLOAT_DTYPES:
            raise UserError(f"{t.file.name}: tensor {name} is {t.dtype}; weights must be F32, F16 or BF16")
        if t.shape != shape:
            raise UserError(f"{t.file.name}: tensor {name} has shape {list(t.shape)}, but config.json implies "
                            f"{list(shape)}")


def alias_tied_embeddings(tensors: dict[str, TensorInfo]) -> None:
    """A tied model may store either the embedding or the head; make both names answer."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if embed not in tensors and head in tensors:
        tensors[embed] = tensors[head]
    elif head not in tensors and embed in tensors:
        tensors[head] = tensors[embed]


class WeightIndex:
    """Every tensor of a model (across shards), read lazily by name."""

    def __init__(self, files: list[Path], tied_embeddings: bool = False):
        self.tensors: dict[str, TensorInfo] = {}
        for path in sorted(files):
            self.tensors.update(read_safetensors_header(path))
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
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        raise UserError(f"{path.name}: tensor {self.tensors[name].name} holds {bad} NaN or Inf "
                                        "value(s); a model with non-finite weights cannot be quantized")
                    out[name] = tensor
        return out

    def layer_names(self, i: int) -> list[str]:
        prefix = f"model.layers.{i}."
        return [n for n in self.tensors if n.startswith(prefix)]


@dataclass(frozen=True)
class ModelDir:
    """A local folder with config, tokenizer and safetensors shards of one model."""

    path: Path

    def config(self):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path / 'config.json'}: cannot read the model config: {exc}") from None
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"{self.path / 'config.json'}: model_type {config.model_type!r} is not supported yet "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        config._attn_implementation = "sdpa"
        return config

    def tokenizer(self):
        from transformers import AutoTokenizer

        if not (self.path / "tokenizer.json").is_file():
            raise UserError(f"{self.path}: the model has no tokenizer.json (a fast tokenizer is required)")
        try:  # no remote code, and only the fast tokenizer's JSON: nothing here unpickles
            return AutoTokenizer.from_pretrained(self.path, local_files_only=True, trust_remote_code=False, use_fast=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path / 'tokenizer_config.json'}: cannot load the tokenizer: {exc}") from None

    def weights(self) -> WeightIndex:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"{self.path}: no .safetensors files")
        return WeightIndex(files, tied_embeddings=bool(self.config().tie_word_embeddings))


CPU = torch.device("cpu")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise UserError("execution.device: cuda was asked for but no CUDA device is present")
    if setting == "cpu" or not torch.cuda.is_available():
        return CPU
    return torch.device("cuda")


class DecoderStack:
    """The pieces of a Llama-family model, built one at a time from given weights."""

    def __init__(self, config, device: torch.device):
        import importlib

        self.config = config
        self.device = device
        mod = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
        prefix = {"llama": "Llama", "mistral": "Mistral"}[config.model_type]
        self._layer_cls = getattr(mod, f"{prefix}DecoderLayer")
        self._norm_cls = getattr(mod, f"{prefix}RMSNorm")
        self._rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config).to(device)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    def layer(self, i: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Decoder layer ``i`` holding ``weights`` (keys relative to the layer, e.g. mlp.up_proj.weight)."""
        with torch.device("meta"):
            layer = self._layer_cls(self.config, i)
        layer.load_state_dict({k: v.to(self.device) for k, v in weights.items()}, assign=True, strict=True)
        return layer.eval()

    @torch.no_grad()
    def run_layer(self, layer: torch.nn.Module, hidden: torch.Tensor, batch: int = 8) -> torch.Tensor:
        """Apply one layer to (samples, seq, hidden) in batches; causal attention, positions from 0."""
        seq = hidden.shape[1]
        pos = torch.arange(seq, device=self.device)[None]
        out = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], batch):
            h = hidden[s:s + batch].to(self.device)
            emb = self._rotary(h, pos)
            out[s:s + batch] = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb).to(out.device)
        return out

    @torch.no_grad()
    def run_layer_by_input(self, layer: torch.nn.Module, hidden: torch.Tensor,
                           before: Callable[[str, list[torch.Tensor]], None], batch: int = 8) -> torch.Tensor:
        """``run_layer``, one Linear input at a time over every sample: ``before(key, inputs)`` (key as in
        INPUT_OF) sees that input of every batch before the Linears reading it run, and may replace their
        weights. The matmuls are one forward pass's, with the same kernels on the same shapes as the
        decoder layer's own forward, so the result is bitwise its result for the same weights."""
        pos = torch.arange(hidden.shape[1], device=self.device)[None]
        starts = range(0, hidden.shape[0], batch)
        h = [hidden[s:s + batch].to(self.device) for s in starts]
        attn_in = [layer.input_layernorm(x) for x in h]
        before("attn_in", attn_in)
        o_proj, layer.self_attn.o_proj = layer.self_attn.o_proj, torch.nn.Identity()
        try:  # the attention without its output projection: what o_proj reads
            o_in = [layer.self_attn(hidden_states=a, attention_mask=None, position_ids=pos,
                                    position_embeddings=self._rotary(x, pos))[0] for a, x in zip(attn_in, h)]
        finally:
            layer.self_attn.o_proj = o_proj
        del attn_in
        before("o_in", o_in)
        h = [x + o_proj(o) for x, o in zip(h, o_in)]
        del o_in
        mlp_in = [layer.post_attention_layernorm(x) for x in h]
        before("mlp_in", mlp_in)
        down_proj, layer.mlp.down_proj = layer.mlp.down_proj, torch.nn.Identity()
        try:  # the MLP without its down projection: what down_proj reads
            down_in = [layer.mlp(m) for m in mlp_in]
        finally:
            layer.mlp.down_proj = down_proj
        del mlp_in
        before("down_in", down_in)
        out = torch.empty_like(hidden)
        for s, x, d in zip(starts, h, down_in):
            out[s:s + batch] = (x + down_proj(d)).to(out.device)
        return out

    def norm(self, weight: torch.Tensor) -> torch.nn.Module:
        norm = self._norm_cls(weight.shape[0], eps=self.config.rms_norm_eps)
        norm.weight.data = weight.to(self.device)
        return norm.to(self.device)


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def relative(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}

