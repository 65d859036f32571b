"""Where a checkpoint's tensors go in the model transformers builds: its own conversion mapping, read as data.

Checkpoints keep mixture-of-experts weights per expert (``mlp.experts.3.gate_proj.weight``) while
transformers 5 holds each expert set as one 3-D parameter (``mlp.experts.gate_up_proj``: experts x
rows x columns, gate and up rows concatenated), and some families rename modules on load (Mixtral's
``block_sparse_moe`` is ``mlp`` in memory). transformers lists those rules per model type
(``conversion_mapping.py``); this module reads the two shapes of rule that move whole tensors (renames,
and experts stacked along a new first axis, optionally with row blocks concatenated) and refuses the
rest by name. Quantization works on the checkpoint's own tensors, so outputs keep the names consumers
expect; only the layer engine sees the fused parameters.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


from quantfab.tasks.errors import UserError
from quantfab.tasks.lazy import lazy

torch = lazy("torch")


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor lives in memory: a whole parameter, or one expert's rows of a 3-D one."""

    name: str  # the parameter's name in memory
    expert: int | None = None
    rows: tuple[int, int] | None = None  # the rows of the expert's matrix it fills (None: all of them)


@dataclass(frozen=True)
class _Merge:
    """Per-expert sources stacked (and their rows concatenated, in source order) into one 3-D target."""

    sources: tuple[re.Pattern, ...]
    source_names: tuple[str, ...]  # as transformers writes them, '*' for the expert
    target: str


class CheckpointMap:
    """The conversion rules transformers applies to ``model_type``'s checkpoints on load."""

    def __init__(self, model_type: str):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        self.renames: list[WeightRenaming] = []  # transformers' own rename_source_key applies them
        self.merges: list[_Merge] = []
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)  # transformers looks the class name up first
        rules = (get_checkpoint_conversion_mapping(causal_lm) if isinstance(causal_lm, str) else None) \
            or get_checkpoint_conversion_mapping(model_type) or []
        for rule in rules:
            ops = [type(op) for op in getattr(rule, "operations", [])]
            dims = [getattr(op, "dim", None) for op in getattr(rule, "operations", [])]
            if isinstance(rule, WeightRenaming) and not isinstance(rule, WeightConverter):
                self.renames.append(rule)
            elif type(rule) is WeightConverter and len(rule.target_patterns) == 1 and (
                    (ops, dims) in (([MergeModulelist], [0]), ([MergeModulelist, Concatenate], [0, 1]))):
                sources = tuple(re.compile(s.replace("*", r"(\d+)")) for s in rule.source_patterns)
                self.merges.append(_Merge(sources, tuple(rule.source_patterns), rule.target_patterns[0]))
            else:
                raise UserError(f"model_type {model_type!r}: transformers converts its checkpoints with "
                                f"{type(rule).__name__}({rule.source_patterns} -> {rule.target_patterns}, "
                                f"{[type(op).__name__ for op in getattr(rule, 'operations', [])]}), a layout "
                                "quantfab cannot map back to the checkpoint's tensors yet")

    def renamed(self, name: str) -> str:
        for rule in self.renames:
            name = rule.rename_source_key(name)[0]
        return name

    def placements(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, Placement]:
        """Every checkpoint tensor (full name -> shape) placed in memory."""
        out: dict[str, Placement] = {}
        stacked: dict[tuple[str, int], list[tuple[int, str]]] = {}  # (target, expert) -> (source index, name)
        for name in shapes:
            memory = self.renamed(name)
            for merge in self.merges:
                found = [(k, m) for k, p in enumerate(merge.sources) if (m := p.search(memory))]
                if found:
                    k, match = found[0]
                    target = memory[:match.start()] + merge.target + memory[match.end():]
                    stacked.setdefault((target, int(match.group(1))), []).append((k, name))
                    break
            else:
                out[name] = Placement(memory)
        for (target, expert), sources in stacked.items():
            start = 0
            for _, name in sorted(sources):
                rows = shapes[name][0]
                out[name] = Placement(target, expert, (start, start + rows) if len(sources) > 1 else None)
                start += rows
        return out

    def checkpoint_shapes(self, memory: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """What a checkpoint of parameters ``memory`` (name -> shape) holds, as transformers saves it: each
        expert's matrices apart (stacked row blocks split evenly), renames undone; checked by mapping back."""
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in memory.items():
            merge = next((m for m in self.merges if m.target in name), None)
            if merge is None:
                out[self._unrenamed(name)] = shape
                continue
            rows = shape[1] // len(merge.source_names)
            for e in range(shape[0]):
                for source in merge.source_names:
                    out[self._unrenamed(name.replace(merge.target, source.replace("*", str(e))))] = (rows, shape[2])
        if {name: shape for name, (shape, _) in memory_shapes(out, self.placements(out)).items()} != memory:
            raise UserError("transformers' conversion rules do not map this model's checkpoint names back to its "
                            "parameters one to one")
        return out

    def _unrenamed(self, name: str) -> str:
        for rule in reversed(self.renames):
            name = rule.reverse_transform().rename_source_key(name)[0]
        return name

    def to_memory(self, tensors: dict[str, torch.Tensor],
                  placements: dict[str, Placement] | None = None) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (full names) as the model's parameters, experts stacked into their 3-D ones
        (``placements``: the tensors' own, where the caller has them already)."""
        placements = placements or self.placements({k: tuple(v.shape) for k, v in tensors.items()})
        out: dict[str, torch.Tensor] = {}
        fused: dict[str, dict[int, list[tuple[tuple[int, int] | None, torch.Tensor]]]] = {}
        for name, tensor in tensors.items():
            p = placements[name]
            if p.expert is None:
                out[p.name] = tensor
            else:
                fused.setdefault(p.name, {}).setdefault(p.expert, []).append((p.rows, tensor))
        for name, experts in fused.items():
            if sorted(experts) != list(range(len(experts))):
                raise UserError(f"{name}: the checkpoint holds experts {sorted(experts)}, not 0..{len(experts) - 1}")
            out[name] = torch.stack([torch.cat([t for _, t in sorted(experts[e], key=lambda rt: rt[0] or (0, 0))])
                                     for e in range(len(experts))])
        return out


def memory_shapes(shapes: dict[str, tuple[int, ...]],
                  placements: dict[str, Placement]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The parameters checkpoint tensors ``shapes`` (name -> shape) placed at ``placements`` make in memory:
    name -> (shape, the first checkpoint tensor of it), experts stacked as transformers stacks them."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    stacked: dict[str, tuple[int, int, int, str]] = {}  # name -> experts, rows, columns, first tensor
    for name, p in placements.items():
        if p.expert is None:
            out[p.name] = (tuple(shapes[name]), name)
            continue
        experts, rows, cols, first = stacked.get(p.name, (0, 0, shapes[name][1], name))
        stacked[p.name] = (max(experts, p.expert + 1), max(rows, p.rows[1] if p.rows else shapes[name][0]), cols, first)
    return out | {name: ((e, r, c), first) for name, (e, r, c, first) in stacked.items()}


@functools.lru_cache(maxsize=None)
def checkpoint_map(model_type: str) -> CheckpointMap:
    return CheckpointMap(model_type)
