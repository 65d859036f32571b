"""Any decoder-only transformers model, run one decoder layer at a time by its own code.

The model is built from its config with parameters on the meta device (buffers such as rotary
frequencies are real: they are computed, not stored). Only the parameters outside the decoder layers
(embedding, final norm, head) are loaded whole; a layer's weights are loaded when it runs, so memory is
one layer plus the hidden states whatever the depth.

What a family passes its layers (masks, rotary embeddings per attention type, position ids...) is not
rebuilt here: the model's own forward runs with every layer stubbed out, and the stubs record the
arguments each layer is called with. Those are replayed when the real layer runs. Mixtures of experts hold each
expert set as one 3-D parameter that the experts module slices per expert and applies with F.linear;
those calls are watched (a torch function mode, only inside experts modules) to see what each expert
reads. Quantization works on the checkpoint's tensors (``units``: per-expert matrices, Linears), named
as on disk; tasks/checkpoint_map.py places them in memory. The head is the model's own too: its forward runs with stubbed layers that hand over given final hidden states, so norms,
soft-capping or logit scales of the family apply as transformers applies them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import greenlet
import torch
from torch.overrides import TorchFunctionMode

from quantfab.tasks.checkpoint_map import Placement, checkpoint_map
from quantfab.tasks.errors import UserError
from quantfab.tasks.model_structure import BATCH, Layout, layer_units, layout


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it was run for has been seen."""


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers where they are made."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config._experts_implementation = "eager"  # experts applied per expert slice, which the engine watches
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config).eval()


def decoder_layers(model: torch.nn.Module, config) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers and its qualified name (``model.layers`` in most families)."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == int(config.num_hidden_layers)]
    for name, m in found:
        if type(m[0]).__name__ in layer_classes:
            return name, m
    if not found:
        raise ValueError(f"{type(model).__name__}: no list of {config.num_hidden_layers} decoder layers")
    return found[0]


def set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (dotted, from ``root``)."""
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


@functools.lru_cache(maxsize=8)
def _skeleton_layout(config_json: str, config_class: type) -> Layout:
    import json

    config = config_class.from_dict(json.loads(config_json))
    name, layers = decoder_layers(skeleton(config), config)
    return Layout(name, tuple(tuple(linear_names(layer)) for layer in layers))


def skeleton_layout(config) -> Layout:
    """The layout of ``config``'s model, read off its meta skeleton (no weights)."""
    return _skeleton_layout(config.to_json_string(use_diff=False), type(config))


@dataclass
class LayerCall:
    """The arguments besides the hidden states that the model passes one layer, for one batch size."""

    args: tuple
    kwargs: dict[str, Any]


@dataclass
class LayerStructure:
    """How a layer's Linears read their inputs, as one forward pass showed it.

    ``groups``: input key -> the Linears reading that very tensor, in the order the layer first reads each
    input (the key is the first of them). ``producers``: input key -> the module whose output that tensor
    is (a norm, for AWQ to fold scales into), where it is one module's output.
    """

    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    producers: dict[str, str] = field(default_factory=dict)
    # input key of an expert -> how its statistics were replaced, for experts routed too few calibration tokens
    fallbacks: dict[str, str] = field(default_factory=dict)

    def group_of(self, module: str) -> str:
        for key, members in self.groups.items():
            if module in members:
                return key
        raise KeyError(f"{module} reads no recorded input")


def expert_index(view: torch.Tensor, param: torch.Tensor) -> int | None:
    """Which expert's matrix of 3-D ``param`` the 2-D ``view`` is (None: not a slice of it)."""
    if view._base is not param or view.dim() != 2:
        return None
    return (view.data_ptr() - param.data_ptr()) // (param.stride(0) * param.element_size())


class _ExpertReads(TorchFunctionMode):
    """Reports each F.linear on one expert's slice of a watched 3-D parameter: ``on_read(units, input)``."""

    def __init__(self, params: list[tuple[torch.Tensor, dict[int, tuple[str, ...]]]],
                 on_read: Callable[[tuple[str, ...], torch.Tensor], None]):
        super().__init__()
        self.params, self.on_read = params, on_read

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            for param, units in self.params:
                e = expert_index(weight, param)
                if e is not None and e in units:
                    self.on_read(units[e], args[0])
        return func(*args, **kwargs)


def linear_names(layer: torch.nn.Module) -> list[str]:
    """The layer's Linears (relative names, module order)."""
    return [name for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


class _ParkedBatch:
    """One batch's layer forward as a greenlet: it can stop inside a hook (``park``) and go on when resumed,
    holding its place in the forward. A greenlet runs on the caller's thread, so torch's thread pool and grad
    mode stay the caller's (with a thread per batch, the GPTQ solve between stops ran 60 % slower: each
    thread's OpenMP pool spun beside it)."""

    def __init__(self, forward: Callable[[], torch.Tensor]):
        self.next = 0  # index of the input it stops at next
        self.result: torch.Tensor | None = None
        self.run = greenlet.greenlet(lambda: setattr(self, "result", forward()))

    @property
    def done(self) -> bool:
        return self.run.dead

    def resume(self) -> None:
        """Run the batch until it parks again or ends; its error is raised here."""
        self.run.switch()

    def park(self) -> None:
        """Inside the batch: hand control back to ``resume``'s caller until resumed."""
        assert self.run.parent is not None
        self.run.parent.switch()

    def abandon(self) -> None:
        """Unwind a parked forward (GreenletExit ends it quietly); a greenlet is true while started and not ended."""
        if self.run:
            self.run.throw()


class Decoder:
    """One model's skeleton, its outer weights and the recorded layer calls, on ``device``."""

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.model = skeleton(config)
        for module in self.model.modules():  # the computed buffers (rotary frequencies, scales) to the device
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.device.type != "meta":
                    module._buffers[name] = buffer.to(device)
        self.layout = layout(config)
        self.layers_name = self.layout.layers_name
        self.map = checkpoint_map(config.model_type)
        self.layers = self.model.get_submodule(self.layers_name)  # meta layers, copied for each real one
        inner = self.layers_name + "."
        self.outer_names = [n for n in self.model.state_dict() if not n.startswith(inner)]
        head = self.model.get_output_embeddings()
        self.head_names = {n for n, p in self.model.named_parameters(remove_duplicate=False)
                           if head is not None and any(p is q for q in head.parameters())}
        embedding = self.model.get_input_embeddings()
        self.embedding_names = {n for n, p in self.model.named_parameters(remove_duplicate=False)
                                if any(p is q for q in embedding.parameters())} - self.head_names
        self.calls: list[dict[int, LayerCall]] = [{} for _ in self.layers]
        self.units: dict[int, dict[str, Placement]] = {}  # per loaded layer: layer_units
        self.checkpoint_modules: dict[int, dict[str, str]] = {}  # per loaded layer: module in memory -> on disk

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def load_outer(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the parameters outside the layers from checkpoint tensors (missing names stay as they are)."""
        for name, value in self.map.to_memory(tensors).items():
            set_tensor(self.model, name, value.to(self.device))

    def entry_names(self) -> list[str]:
        """Outer tensors the forward reads before the first layer: all but the head's."""
        return [n for n in self.outer_names if n not in self.head_names]

    def exit_names(self) -> list[str]:
        """Outer tensors ``logits`` reads: all but the input embedding's (a tied one is the head's too)."""
        return [n for n in self.outer_names if n not in self.embedding_names]

    def layer(self, i: int, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """Decoder layer ``i`` holding ``weights`` (checkpoint names relative to the layer)."""
        prefix = self.layout.prefix(i)
        shapes = {k: tuple(v.shape) for k, v in weights.items()}
        placed = self.map.placements({prefix + k: s for k, s in shapes.items()})
        self.units[i] = layer_units(self.config, shapes, i, placed)
        self.checkpoint_modules[i] = {p.name.removeprefix(prefix).rpartition(".")[0]: k.removeprefix(prefix).rpartition(".")[0]
                                      for k, p in placed.items() if p.expert is None}
        memory = self.map.to_memory({prefix + k: v.to(self.device) for k, v in weights.items()}, placed)
        layer = copy.deepcopy(self.layers[i])
        layer.load_state_dict({k.removeprefix(prefix): v for k, v in memory.items()}, assign=True, strict=True)
        return layer.eval()

    def _experts(self, i: int, layer: torch.nn.Module) -> dict[str, list[tuple[torch.Tensor, dict[int, tuple[str, ...]]]]]:
        """Layer ``i``'s experts modules (by name) -> their 3-D parameters, each with its units per expert."""
        rows: dict[tuple[str, str], dict[int, list[tuple[tuple[int, int], str]]]] = {}
        for unit, p in self.units[i].items():
            if p.expert is not None:
                owner, _, leaf = p.name.rpartition(".")
                rows.setdefault((owner, leaf), {}).setdefault(p.expert, []).append((p.rows or (0, 0), unit))
        out: dict[str, list] = {}
        for (owner, leaf), experts in rows.items():
            param = layer.get_submodule(owner)._parameters[leaf]
            out.setdefault(owner, []).append((param, {e: tuple(u for _, u in sorted(us)) for e, us in experts.items()}))
        return out

    @contextlib.contextmanager
    def reading(self, i: int, layer: torch.nn.Module,
                on_read: Callable[[tuple[str, ...], torch.Tensor], None]) -> Iterator[None]:
        """``on_read(units, x)`` whenever layer ``i`` (loaded by ``layer``) applies units to an input ``x``: a
        Linear's pre-hook, or an expert's F.linear (its units: the checkpoint matrices stacked in that slice)."""
        handles = [layer.get_submodule(p.name.removesuffix(".weight")).register_forward_pre_hook(
            lambda _m, args, unit=unit: on_read((unit,), args[0]))
            for unit, p in self.units[i].items() if p.expert is None]
        wrapped = []
        for owner, params in self._experts(i, layer).items():
            module = layer.get_submodule(owner)
            original = module.forward

            def watched(*args, original=original, params=params, **kwargs):
                with _ExpertReads(params, on_read):
                    return original(*args, **kwargs)
            module.forward = watched
            wrapped.append(module)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module in wrapped:
                del module.forward

    @contextlib.contextmanager
    def reading_all_tokens(self, i: int, layer: torch.nn.Module, experts: set[tuple[str, ...]],
                           on_read: Callable[[tuple[str, ...], torch.Tensor], None]) -> Iterator[None]:
        """``on_read`` for the experts holding ``experts`` (units), each run on every token its experts module
        receives, as if the router sent all of them to it (with weight 1); the layer's output is unchanged."""
        wrapped = []
        asked = {u for group in experts for u in group}
        for owner, params in self._experts(i, layer).items():
            wanted = sorted({e for _, units in params for e, us in units.items() if asked & set(us)})
            if not wanted:
                continue
            module = layer.get_submodule(owner)
            original = module.forward

            def forced(x, *args, original=original, params=params, wanted=wanted, **kwargs):
                out = original(x, *args, **kwargs)
                n = x.shape[0]
                with _ExpertReads(params, on_read):
                    for e in wanted:
                        original(x, torch.full((n, 1), e, dtype=torch.long, device=x.device),
                                 torch.ones((n, 1), dtype=x.dtype, device=x.device))
                return out
            module.forward = forced
            wrapped.append(module)
        try:
            yield
        finally:
            for module in wrapped:
                del module.forward

    def set_weight(self, i: int, layer: torch.nn.Module, unit: str, value: torch.Tensor) -> None:
        """Put ``value`` in layer ``i`` where checkpoint matrix ``unit`` lives (a Linear's weight or expert rows)."""
        p = self.units[i][unit]
        owner, _, leaf = p.name.rpartition(".")
        param = layer.get_submodule(owner)._parameters[leaf]
        value = value.to(param.device, param.dtype)
        if p.expert is None:
            param.data = value
        elif p.rows is None:
            param.data[p.expert] = value
        else:
            param.data[p.expert, p.rows[0]:p.rows[1]] = value

    def is_expert(self, i: int, unit: str) -> bool:
        return self.units[i][unit].expert is not None

    @contextlib.contextmanager
    def _stubbed(self, forward: Callable[[int, tuple, dict], torch.Tensor]) -> Iterator[None]:
        """Every layer's forward replaced by ``forward(i, args, kwargs)``; the meta layers keep their attributes."""
        for i, layer in enumerate(self.layers):
            layer.forward = lambda *args, i=i, **kwargs: forward(i, args, kwargs)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    @torch.no_grad()
    def embed(self, ids: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
        """The first layer's input for token windows ``ids`` (samples, seq), as the model computes it; records
        every layer's call arguments for the batch sizes seen. Needs the outer tensors ``entry_names`` loaded; the
        input embedding goes back to meta afterwards (nothing else reads it: vocab x hidden floats freed)."""
        out: torch.Tensor | None = None

        def record(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
            size = int(args[0].shape[0])
            if size not in self.calls[i]:
                self.calls[i][size] = LayerCall(args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == 0:
                first.append(args[0])
            if i == self.num_layers - 1:
                raise _Stop
            return args[0]

        for s in range(0, ids.shape[0], batch):
            first: list[torch.Tensor] = []
            with self._stubbed(record), contextlib.suppress(_Stop):
                self.model(input_ids=ids[s:s + batch].to(self.device), use_cache=False)
            h = first[0].to(torch.float32)
            if out is None:
                out = torch.empty((ids.shape[0], *h.shape[1:]), dtype=torch.float32, device=self.device)
            out[s:s + batch] = h
        if 1 not in self.calls[0]:  # the one-sample calls `structure` runs with
            with self._stubbed(record), contextlib.suppress(_Stop):
                first = []
                self.model(input_ids=ids[:1].to(self.device), use_cache=False)
        for name in self.embedding_names:
            set_tensor(self.model, name, self.model.get_parameter(name).to("meta"))
        assert out is not None
        return out

    def _call(self, i: int, layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        call = self.calls[i][int(h.shape[0])]
        out = layer(h, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run_layer(self, i: int, layer: torch.nn.Module, hidden: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
        """Layer ``i`` applied to (samples, seq, hidden), with the arguments the model passes it."""
        out = torch.empty_like(hidden)
        for s in range(0, hidden.shape[0], batch):
            out[s:s + batch] = self._call(i, layer, hidden[s:s + batch].to(self.device)).to(out.device)
        return out

    @torch.no_grad()
    def structure(self, i: int, layer: torch.nn.Module, hidden: torch.Tensor) -> LayerStructure:
        """Which units read the same tensor, and which module made it, from one sample through layer ``i``.

        Experts not routed that sample are still listed: each expert set's groups (one per expert and
        parameter, e.g. gate+up, then down) all stand where the set is first read, in expert order."""
        # Tensors are tracked by weak reference, so the pass holds no more than a forward does; an id is trusted
        # only while its reference still points at the very tensor (a freed tensor's id can be reused).
        inputs: list[tuple[weakref.ref, list[str], str | None]] = []  # read tensors, in order: readers, producer
        input_at: dict[int, int] = {}  # id -> index in inputs
        made_by: dict[int, tuple[weakref.ref, str]] = {}

        def read(units: tuple[str, ...], x: torch.Tensor) -> None:
            at = input_at.get(id(x))
            if at is None or inputs[at][0]() is not x:
                made = made_by.get(id(x))
                input_at[id(x)] = at = len(inputs)
                inputs.append((weakref.ref(x), [], made[1] if made and made[0]() is x else None))
            inputs[at][1].extend(units)

        handles = []
        for name, module in layer.named_modules():
            if name:
                def made(_m, _args, output, name=name):
                    if isinstance(output, torch.Tensor):
                        made_by[id(output)] = (weakref.ref(output), name)
                handles.append(module.register_forward_hook(made))
        try:
            with self.reading(i, layer, read):
                self._call(i, layer, hidden[:1].to(self.device))
        finally:
            for h in handles:
                h.remove()
        experts = self._experts(i, layer)
        expert_of = {u: owner for owner, params in experts.items() for _, units in params
                     for us in units.values() for u in us}
        result = LayerStructure()
        modules = self.checkpoint_modules[i]
        for _, names, producer in inputs:
            members = tuple(dict.fromkeys(names))
            owner = expert_of.get(members[0])
            if owner is None:
                result.groups[members[0]] = members
                if producer is not None:
                    result.producers[members[0]] = modules.get(producer, producer)
            elif owner in experts:  # the first read of this expert set: all its groups, here
                for _, units in experts.pop(owner):
                    for e in sorted(units):
                        result.groups[units[e][0]] = units[e]
        if experts:
            raise UserError(f"{self.config.model_type}: experts module(s) {sorted(experts)} of layer {i} never applied "
                            "F.linear to one expert's slice of their weights; quantfab reads experts only in that "
                            "(transformers' eager) layout")
        return result

    @torch.no_grad()
    def inputs_of(self, i: int, layer: torch.nn.Module, hidden: torch.Tensor, key: str,
                  batch: int = BATCH) -> list[torch.Tensor]:
        """What input ``key`` (a group key of ``structure``) is, per batch, when layer ``i`` runs on ``hidden``;
        each pass stops there (a batch routing no token to an expert adds nothing for it)."""
        seen: list[torch.Tensor] = []

        def grab(units: tuple[str, ...], x: torch.Tensor) -> None:
            if units[0] == key:
                seen.append(x)
                raise _Stop

        with self.reading(i, layer, grab):
            for s in range(0, hidden.shape[0], batch):
                with contextlib.suppress(_Stop):
                    self._call(i, layer, hidden[s:s + batch].to(self.device))
        return seen

    @torch.no_grad()
    def run_layer_fitting(self, i: int, layer: torch.nn.Module, hidden: torch.Tensor, keys: list[str],
                          on_input: Callable[[str, torch.Tensor], None], fit: Callable[[str], None],
                          batch: int = BATCH) -> torch.Tensor:
        """Layer ``i`` applied to ``hidden`` in one pass that stops, batch by batch, where each of ``keys`` (group
        keys of ``structure``, in reading order, none an expert's) is read: ``on_input(key, x)`` takes every
        batch's input there, then ``fit(key)`` sets the weights of the units reading it, and the batches go on
        with those. True-sequential fitting then costs one forward pass a layer, where a pass stopping at each
        input would recompute the start of the layer for every one; the batches' states held at a stop are
        what the stop's input already costs. The batches run one at a time, in batch order, so the inputs come
        in the order a plain pass gives them, and the codes are those of passes stopping at each input."""
        batches: dict[greenlet.greenlet, _ParkedBatch] = {}

        def stop(units: tuple[str, ...], x: torch.Tensor) -> None:
            b = batches.get(greenlet.getcurrent())
            if b is not None and b.next < len(keys) and units[0] == keys[b.next]:
                on_input(keys[b.next], x)
                b.next += 1
                b.park()

        starts = range(0, hidden.shape[0], batch)
        runs = [_ParkedBatch(functools.partial(self._call, i, layer, hidden[s:s + batch].to(self.device))) for s in starts]
        batches.update({b.run: b for b in runs})
        try:
            with self.reading(i, layer, stop):
                for k, key in enumerate([*keys, None]):
                    for b in runs:
                        if not b.done:
                            b.resume()
                    if key is not None:
                        missed = [n for n, b in enumerate(runs) if b.next <= k]
                        if missed:
                            raise RuntimeError(f"layer {i}: batch {missed[0]} ended without reading input {key}")
                        fit(key)
        finally:
            for b in runs:
                b.abandon()
        out = torch.empty_like(hidden)
        for s, b in zip(starts, runs):
            assert b.result is not None
            out[s:s + batch] = b.result.to(out.device)
        return out

    @torch.no_grad()
    def logits(self, final: torch.Tensor) -> torch.Tensor:
        """The model's logits where its last layer outputs ``final`` (windows, positions, hidden); needs the
        ``exit_names`` tensors. The layers are skipped, so no token is embedded: zeros stand in for the embeddings."""
        last = self.num_layers - 1

        def hand_over(i: int, args: tuple, kwargs: dict) -> torch.Tensor:
            return final.to(self.device, args[0].dtype) if i == last else args[0]

        with self._stubbed(hand_over):
            return self.model(inputs_embeds=torch.zeros_like(final, device=self.device), use_cache=False).logits.float()
