"""A model's structure as plain data: its decoder layout, where its checkpoint tensors live, its units.

The layout (which Linears each decoder layer holds) is read off the model's meta skeleton (decoder.py) and
the tensors are placed by transformers' conversion rules (checkpoint_map.py): both import torch and
transformers, seconds per process. `plan` and the flow's cache keys need only those, the parameter shapes
the config implies and the config's attributes, which depend on config.json, the checkpoint's tensor
names and shapes, the transformers and torch versions and the code deriving them alone. ``frozen_config``
memoizes them as JSON under a digest of those (beside the store's results), so a model seen before is
planned without importing either.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from dataclasses import dataclass
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantfab.tasks.checkpoint_map import Placement, checkpoint_map

if TYPE_CHECKING:
    from quantfab.tasks.modelio import ModelDir, TensorInfo

ROOT = Path(__file__).resolve().parent.parent
BATCH = 8  # samples per layer call of the decoder (here, so that plan can size a batch without torch)
SOURCES = ["tasks/model_structure.py", "tasks/modelio.py", "tasks/decoder.py", "tasks/families.py",
           "tasks/checkpoint_map.py"]  # the code that derives the facts: editing it invalidates the memo


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its decoder layers and which Linears each holds (names relative to the layer)."""

    layers_name: str
    linears: tuple[tuple[str, ...], ...]

    def prefix(self, i: int) -> str:
        return f"{self.layers_name}.{i}."


class FrozenConfig:
    """Reads like the transformers config it was made from (attributes, aliases and properties alike), for
    code that only reads a config; ``expected``, ``layout`` and ``placements`` answer what the meta skeleton
    and transformers' conversion rules would, the last for the checkpoint it was made with."""

    def __init__(self, attributes: dict[str, Any], expected: dict[str, tuple[int, ...]], layout: Layout,
                 placements: dict[str, Placement]):
        self.__dict__.update(_attributes=attributes, expected=expected, layout=layout, placements=placements)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_attributes"][name]
        except KeyError:
            raise AttributeError(f"config has no attribute {name!r}") from None

    @classmethod
    def of(cls, config: Any, shapes: dict[str, tuple[int, ...]]) -> FrozenConfig:
        """Freeze a transformers config and place the checkpoint tensors ``shapes`` (imports torch and
        transformers, builds the meta skeleton)."""
        from quantfab.tasks.decoder import skeleton_layout
        from quantfab.tasks.modelio import expected_shapes

        attributes = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated properties warn when read
            for name in sorted({*dir(config), *getattr(config, "attribute_map", {})}):
                if name.startswith("_"):
                    continue
                try:
                    value = getattr(config, name)
                except Exception:  # a property that does not apply to this config
                    continue
                if type(value).__module__ == "torch":  # a torch.dtype: by name, as config.json writes it
                    value = str(value).removeprefix("torch.")
                if not callable(value) and _is_json(value):
                    attributes[name] = value
        return cls(attributes, expected_shapes(config), skeleton_layout(config),
                   checkpoint_map(config.model_type).placements(shapes))

    def to_json(self) -> str:
        return json.dumps({"attributes": self._attributes, "expected": self.expected,
                           "layout": [self.layout.layers_name, self.layout.linears],
                           "placements": {n: [p.name, p.expert, p.rows] for n, p in self.placements.items()}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FrozenConfig:
        data = json.loads(text)
        name, linears = data["layout"]
        return cls(data["attributes"], {k: tuple(v) for k, v in data["expected"].items()},
                   Layout(name, tuple(tuple(layer) for layer in linears)),
                   {n: Placement(memory, expert, tuple(rows) if rows else None)
                    for n, (memory, expert, rows) in data["placements"].items()})


def frozen_config(model: ModelDir, tensors: dict[str, TensorInfo], memo: Path) -> FrozenConfig:
    """``model``'s config frozen with its checkpoint ``tensors`` placed (those a tied model aliases too), from
    the memo in ``memo`` when it holds one for this config.json, these tensors and this code; else derived
    (the config is checked as ModelDir.config checks it) and memoized. An unreadable memo is derived again;
    one that cannot be written is not an error."""
    shapes = {n: tuple(t.shape) for n, t in sorted(tensors.items())}
    key = hashlib.sha256((model.path / "config.json").read_bytes())
    key.update(json.dumps(shapes).encode())
    for dist in ("transformers", "torch"):
        key.update(f"\0{dist}={dist_version(dist)}".encode())
    for rel in SOURCES:
        key.update(b"\0" + (ROOT / rel).read_bytes())
    path = memo / f"{key.hexdigest()}.json"
    try:
        return FrozenConfig.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        pass
    config = model.config()
    if config.tie_word_embeddings:
        tied = dict(tensors)
        alias_tied_embeddings(tied)
        shapes = {n: tuple(t.shape) for n, t in tied.items()}
    frozen = FrozenConfig.of(config, shapes)
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        memo.mkdir(parents=True, exist_ok=True)
        tmp.write_text(frozen.to_json())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return frozen


def alias_tied_embeddings(tensors: dict[str, TensorInfo]) -> None:
    """A tied model may store either the embedding or the head; make both names answer."""
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if embed not in tensors and head in tensors:
        tensors[embed] = tensors[head]
    elif head not in tensors and embed in tensors:
        tensors[head] = tensors[embed]


def placements(config, shapes: dict[str, tuple[int, ...]]) -> dict[str, Placement]:
    """Where each checkpoint tensor lives in memory: frozen with the config, or by transformers' rules."""
    if isinstance(config, FrozenConfig):
        return {name: config.placements[name] for name in shapes}
    return checkpoint_map(config.model_type).placements(shapes)


def layout(config) -> Layout:
    """The layout of ``config``'s model: frozen with it, or read off its meta skeleton (torch)."""
    if isinstance(config, FrozenConfig):
        return config.layout
    from quantfab.tasks.decoder import skeleton_layout

    return skeleton_layout(config)


def layer_units(config, shapes: dict[str, tuple[int, ...]], i: int,
                placed: dict[str, Placement] | None = None) -> dict[str, Placement]:
    """Layer ``i``'s quantizable matrices, by checkpoint name relative to the layer and without ``.weight``,
    each with where it lives in memory (relative to the layer): the Linears' weights, and every expert's
    matrices. ``shapes``: the layer's checkpoint tensors (relative names); ``placed``: their placements (full
    names), where the caller has them already. Linears first, in module order."""
    shape = layout(config)
    prefix = shape.prefix(i)
    linears = {name: k for k, name in enumerate(shape.linears[i])}
    placed = placed or placements(config, {prefix + k: v for k, v in shapes.items()})
    found: list[tuple[tuple, str, Placement]] = []
    for name, p in placed.items():
        rel, memory = name[len(prefix):], p.name.removeprefix(prefix)
        if not rel.endswith(".weight") or len(shapes[rel]) != 2:
            continue
        if p.expert is not None:
            found.append(((len(linears), p.expert, memory, p.rows or (0, 0)), rel, Placement(memory, p.expert, p.rows)))
        elif memory.removesuffix(".weight") in linears:
            found.append(((linears[memory.removesuffix(".weight")],), rel, Placement(memory)))
    return {rel.removesuffix(".weight"): p for _, rel, p in sorted(found)}


def model_units(config, shapes: dict[str, tuple[int, ...]]) -> list[list[str]]:
    """Every layer's units (see ``layer_units``), from the checkpoint's tensor names and shapes."""
    shape = layout(config)
    by_layer: list[dict[str, tuple[int, ...]]] = [{} for _ in shape.linears]
    inner = shape.layers_name + "."
    for name, dims in shapes.items():
        if name.startswith(inner):
            index, _, rest = name[len(inner):].partition(".")
            if index.isdigit() and int(index) < len(by_layer):
                by_layer[int(index)][rest] = tuple(dims)
    return [list(layer_units(config, layer, i)) for i, layer in enumerate(by_layer)]


def _is_json(value: Any) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False
