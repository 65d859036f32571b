"""`quantfab plan`: what a run would do, before any GPU time is spent.

For each stage: whether Prefect's cache already holds it (the same key the run will compute), or why it
must run or cannot run yet, and its estimated peak working memory; for each output format: its
estimated size and bits per weight. All from the safetensors headers alone (no weights are read).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantfab.pipelines.keys import ORDER, cache_key, cached_result, stage_inputs
from quantfab.pipelines.recipe import Recipe
from quantfab.tasks import synthetic
from quantfab.tasks.convert import FORMATS, differences
from quantfab.tasks.redact import redact, redact_text
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UnsupportedModel, UserError
from quantfab.tasks.manifests import Allocation, Manifest
from quantfab.tasks.modelio import ST_DTYPES, ModelDir, TensorInfo, check_against_config, read_headers
from quantfab.tasks.model_structure import BATCH, FrozenConfig, alias_tied_embeddings, frozen_config, layout, model_units
from quantfab.tasks.malloc import KEEP
from quantfab.tasks.quantize.allocate import KL_STATES, kl_windows
from quantfab.tasks.quantize.assign import assign_layers, budget_of, measures_inputs, reads_full_statistics, reads_statistics
from quantfab.tasks.store import Store, filesystem, free_bytes


@dataclass
class StagePlan:
    stage: str
    status: str  # hit | miss | blocked
    why: str = ""


@dataclass
class Plan:
    recipe: Recipe
    store_url: str
    stages: list[StagePlan]
    sizes: dict[str, tuple[int, float] | str] = field(default_factory=dict)  # output -> (bytes, bits/weight) or why unknown
    memory: dict[str, int] = field(default_factory=dict)  # stage -> estimated peak working bytes
    writes: dict[str, int] = field(default_factory=dict)  # stage -> estimated bytes it adds to the store (or destination)
    nominal: dict[str, float] = field(default_factory=dict)  # output -> bits/weight had nothing fallen back
    fallbacks: dict[str, list[str]] = field(default_factory=dict)  # output -> "tensor: why" for each that differs
    budgets: dict[str, str] = field(default_factory=dict)  # output -> what its size budget chose (or will choose)
    statistics: bool | None = None  # whether calibrate gathers the unquantized model's statistics (None: unknown)
    diagonal: bool = False  # only XᵀX's diagonal of them: nothing but an importance matrix reads them

    @property
    def gathers(self) -> str | None:
        """What calibrate gathers: "none", "diagonal" or "full" (None: unknown)."""
        if self.statistics is None:
            return None
        return "diagonal" if self.diagonal else "full" if self.statistics else "none"

    def notes(self, key: str) -> list[str]:
        """What the plan says under an output's size: its fallbacks by reason, and a warning when oversized."""
        size = self.sizes.get(key)
        if isinstance(size, str) or size is None:
            return []
        found = self.fallbacks.get(key, [])
        lines = [f"size budget: {self.budgets[key]}"] if key in self.budgets else []
        lines += [f"{len(found)} tensors differ from the recipe: " + "; ".join(differences.summary(found))] if found else []
        warning = differences.oversize(size[1], self.nominal.get(key, 0.0))
        return lines + ([f"WARNING: {warning}"] if warning else [])

    @property
    def peak_rss(self) -> int | None:
        """The run's estimated peak RSS: the process itself plus the largest stage that will run."""
        if not self.memory:
            return None
        runs = {s.stage for s in self.stages if s.status != "hit"}
        return RUNTIME + max((n for stage, n in self.memory.items() if stage in runs), default=0)

    def space(self) -> dict[str, int]:
        """Estimated bytes this run writes to the store and to the destination: the stages that will run."""
        runs = {s.stage for s in self.stages if s.status != "hit"}
        return {"store": sum(n for stage, n in self.writes.items() if stage in runs and stage != "package"),
                "destination": self.writes.get("package", 0) if "package" in runs else 0}


def space_report(p: Plan) -> str:
    """What this run writes where (estimated), beside the free space there now; NOT ENOUGH where short."""
    dest_fs, dest_root = filesystem(p.recipe.package.destination, "package.destination")
    store = Store(p.store_url)
    free = {"store": free_bytes(store.fs, store.root), "destination": free_bytes(dest_fs, dest_root)}
    parts = []
    for where, need in p.space().items():
        have = free[where]
        room = "" if have is None else f", {have / 2**20:,.1f} MiB free" + (" NOT ENOUGH" if have < need else "")
        parts.append(f"{where} ~{need / 2**20:,.1f} MiB{room}")
    return "; ".join(parts)


RUNTIME = 400 * 2**20  # RSS of a process that has imported the flow (torch, transformers, Prefect), measured
LOGPROB_TEMPS = 6 * 8 * 2**22  # validate's float64 chunks per source pair (tasks/validate.py LOGPROB_CHUNK)
GRID_TEMPS = 10 * 4 * 2**22  # a grid's float32 temporaries over reference_by_rows' slice of rows


def peak_memory(recipe: Recipe, config: Any, tensors: dict[str, TensorInfo], sizes: dict[str, int],
                statistics: bool, sequential: bool, diagonal: bool = False) -> dict[str, int]:
    """Peak working memory per stage from the tensor shapes, for the stages' one-layer-at-a-time design,
    above the process's own ``RUNTIME``.

    On the host, or on the GPU for the stages that run there (calibrate, quantize, validate) when
    execution.device is cuda. The terms are what each stage holds at its peak: one decoder layer in fp32 per
    model it runs side by side, the hidden states of its tokens, XᵀX of each distinct Linear input (float32),
    the embedding or head in fp32, and files it maps (a converted output is read back through mmap). A
    sequential method (GPTQ) also holds every batch parked at the widest Linear input (that input, and the
    residual and normed states each batch's forward keeps, over every calibration token), that input's XᵀX
    with its factor and inverse, four copies of the largest Linear, a batch's attention scores, and the freed
    memory glibc keeps for the next layer (tasks/malloc.py KEEP). An estimate of what bench/end_to_end_1b.py
    measures, not a bound.
    """
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    prefix = layout(config).prefix(0)
    layer0 = {n: t for n, t in tensors.items() if n.startswith(prefix)}
    layer = 4 * sum(t.numel for t in layer0.values())
    inputs = {t.shape[1] for n, t in layer0.items() if len(t.shape) == 2}  # distinct Linear input widths
    hessians = 4 * sum(i if diagonal else i * i for i in inputs)
    largest = 4 * max((t.numel for t in tensors.values()), default=0)
    matrix = 4 * vocab * hidden  # the embedding, or the head, in fp32
    cal = recipe.calibration
    states = 2 * 4 * cal.samples * cal.seq_len * hidden  # a layer's input and output
    models = 1 + len(recipe.outputs)  # validate runs the unquantized model beside each output
    val = recipe.validate_
    tokens = max(val.tokens // val.window, 1) * val.window
    gathers = states + hessians if statistics else 0
    if sequential:
        tokens_c, widest = cal.samples * cal.seq_len, max(inputs, default=0)
        heads = int(getattr(config, "num_attention_heads", 0) or 0)
        gathers = (states + 4 * tokens_c * (widest + 2 * hidden) + 3 * 4 * widest * widest + 4 * largest_linear(layer0)
                   + 3 * 4 * BATCH * heads * cal.seq_len ** 2 + KEEP)
    budgeted = any(budget_of(o) for o in recipe.outputs)
    kl_states = 4 * kl_windows(cal.samples, cal.seq_len) * cal.seq_len * hidden  # one model's hidden states
    kl_units = min(sum(len(u) for u in model_units(config, {n: t.shape for n, t in tensors.items()})),
                   max(1, KL_STATES // kl_states))
    return {
        "download": 0,  # streams files into the store
        "calibrate": matrix + layer + gathers if statistics else 0,
        # a budget's KL per unit: the float model's input to every layer (kept on the CPU), a batch of units' hidden
        # states beside the float one, a float and a patched layer, the head and its log-probabilities
        "allocate": (len(layout(config).linears) + kl_units + 1) * kl_states + 2 * layer + matrix + LOGPROB_TEMPS
        if budgeted else 0,
        "quantize": layer + gathers + GRID_TEMPS,
        "convert": 3 * largest + max(sizes.values(), default=0),  # a tensor, its codes, its decoding; the file read back
        "validate": max(models * (layer + 4 * tokens * hidden) + matrix,  # the layers, each model's hidden states
                        models * (matrix + 4 * tokens * hidden) + LOGPROB_TEMPS + sum(sizes.values())),  # the heads
        "package": 0,  # copies files
    }


def _extra_measures(r: Recipe) -> str:
    """What validate measures beside the windows: task evals and llama-bench speeds."""
    shown = [f"{t.label} ({t.kind}{f', {t.new_tokens} tokens' if t.kind == 'continuation' else ''})"
             for t in r.validate_.tasks]
    speed = r.validate_.speed
    return (f"; task evals: {', '.join(shown)}" if shown else "") + (
        f"; speed: llama-bench pp{speed.prompt_tokens}/tg{speed.generated_tokens} on each GGUF"
        f"{' and an F16 reference' if speed.reference else ''}" if speed else "")


def largest_linear(layer: dict[str, TensorInfo]) -> int:
    return 4 * max((t.numel for t in layer.values() if len(t.shape) == 2), default=0)


def plan(recipe: Recipe, store_url: str | None) -> Plan:
    store = Store(store_url)
    up: dict[str, Any] = {}
    stages: list[StagePlan] = []
    for stage in ORDER:
        if stage == "package" and "validate" in up and not up["validate"].passed:
            stages.append(StagePlan(stage, "blocked", "the cached validate result fails its gates"))
            break
        if len(up) < ORDER.index(stage):
            stages.append(StagePlan(stage, "miss", "an upstream stage will run"))
            continue
        key = cache_key(stage, stage_inputs(stage, recipe, store.url, up))
        result = cached_result(store, key)
        problems = result.problems(store, move_aside=False) if isinstance(result, Manifest) else []
        if problems:
            stages.append(StagePlan(stage, "miss", f"cached record found, but {len(problems)} of its blobs cannot "
                                                   f"be used: {problems[0]}"))
        elif result is None:
            stages.append(StagePlan(stage, "miss", "no cached result for these inputs"))
        else:
            up[stage] = result
            stages.append(StagePlan(stage, "hit", f"key {key[:12]}"))
    for stage in ORDER[len(stages):]:
        stages.append(StagePlan(stage, "blocked", "an upstream stage cannot run"))
    out = Plan(recipe, store.url, stages)
    try:
        config, tensors = _headers(recipe, store, up.get("download"))
        check_against_config(config, tensors)
    except UnsupportedModel:
        raise  # what the model is, not whether it could be read: the plan fails on it
    except (UserError, OSError, ValueError) as exc:
        out.sizes = {o.key: f"unknown: cannot read the model's headers ({redact_text(str(exc))})" for o in recipe.outputs}
        return out
    params = sum(t.numel for n, t in tensors.items() if n == t.name)
    runs_sequential = False
    for o in recipe.outputs:
        fmt = FORMATS[o.format]
        allocated = up["allocate"].outputs.get(o.key) if "allocate" in up else None
        layers = assign_layers(config, tensors, recipe.quantize, fmt, o, allocated and allocated.types)
        runs_sequential |= measures_inputs(layers, fmt.measured_scales(o))
        assigned = [a for layer in layers for a in layer.values()]
        budget = budget_of(o)
        if budget and allocated is None:  # sized by its budget until allocate has chosen the types
            out.sizes[o.key] = (int(budget * params / 8), budget)
            out.nominal[o.key] = budget
            out.budgets[o.key] = f"types chosen by the allocate stage, after calibrate, for {budget:g} bits/weight"
            continue
        if allocated is not None:
            out.budgets[o.key] = allocation_summary(allocated)
        size = sum(t.nbytes for t in fmt.plan(o, config, tensors, {a.module: a.grid for a in assigned}))
        out.sizes[o.key] = (size, size * 8 / params)
        nominal = differences.nominal_bytes(fmt, o, config, tensors, {a.module: a.asked or a.grid for a in assigned})
        out.nominal[o.key] = nominal * 8 / params
        out.fallbacks[o.key] = differences.fallbacks(fmt, o, config, tensors, {a.module: a.fallback for a in assigned})
    sizes = {k: v[0] for k, v in out.sizes.items() if not isinstance(v, str)}
    full = reads_full_statistics(config, tensors, recipe.quantize, list(recipe.outputs))
    out.statistics = reads_statistics(config, tensors, recipe.quantize, list(recipe.outputs), full)
    out.diagonal = out.statistics and not full
    out.writes = store_writes(recipe, tensors, sizes, out.diagonal)
    out.memory = peak_memory(recipe, config, tensors, sizes, out.statistics, runs_sequential, out.diagonal)
    return out


def allocation_summary(allocated: Allocation) -> str:
    """What a budget chose: how many Linears got each type, and the bits per weight it predicts."""
    counts = Counter(allocated.types.values())
    mix = ", ".join(f"{n} × {g}" for g, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return (f"{allocated.bits_per_weight:.3f} of {allocated.target_bits_per_weight:g} bits/weight in tensors; "
            f"Linears: {mix}")


def store_writes(recipe: Recipe, tensors: dict[str, TensorInfo], sizes: dict[str, int],
                 diagonal: bool = False) -> dict[str, int]:
    """About how many bytes each stage adds to the store (package: to the destination), from the headers.

    download: the checkpoint; calibrate: float32 XᵀX of each Linear input per layer, or with ``diagonal`` its
    diagonal alone (Linears under one parent reading one width counted once); quantize: a byte per quantized weight for each output;
    convert: the output files, plus the largest once more (written in scratch, then copied in).
    """
    weights = sum(t.numel * ST_DTYPES.get(t.dtype, 4) for n, t in tensors.items() if n == t.name)
    layers = [n for n, t in tensors.items() if ".layers." in n and len(t.shape) == 2 and n.endswith(".weight")]
    inputs = {(n.rsplit(".", 2)[0], tensors[n].shape[1]) for n in layers}
    return {"download": weights,
            "calibrate": sum(4 * (width if diagonal else width * width) for _, width in inputs),
            "quantize": len(recipe.outputs) * sum(tensors[n].numel for n in layers),
            "convert": sum(sizes.values()) + max(sizes.values(), default=0),
            "package": sum(sizes.values())}


def _headers(recipe: Recipe, store: Store, model) -> tuple[FrozenConfig, dict[str, TensorInfo]]:
    """Config (frozen: from the memo, for a model seen before) and tensor headers: from the cached download, a
    synthetic spec, or ranged reads of the source."""
    if model is not None:
        return materialize(store, model.files, verify=False).frozen(store.memo_dir())  # config and headers only
    source = recipe.model.source
    with tempfile.TemporaryDirectory() as tmp:
        folder = ModelDir(Path(tmp), redact(source))
        if source.startswith("synthetic://"):
            tensors = synthetic.headers(source, folder.path)
        else:
            fs, root = filesystem(source, "model.source")
            fs.get_file(f"{root}/config.json", str(folder.path / "config.json"))
            files = []
            for info in fs.ls(root, detail=True):
                if info["name"].endswith(".safetensors"):
                    files.append(folder.path / Path(info["name"]).name)
                    with fs.open(info["name"], "rb") as src:
                        head = src.read(8)
                        files[-1].write_bytes(head + src.read(int.from_bytes(head, "little")))
            tensors = read_headers(files, header_only=True)
        config = frozen_config(folder, tensors, store.memo_dir())
    if config.tie_word_embeddings:
        alias_tied_embeddings(tensors)
    return config, tensors


def render(p: Plan) -> str:
    r = p.recipe
    lines = [f"recipe {r.name}: {redact(r.model.source)} -> {', '.join(o.key for o in r.outputs)} at {redact(r.package.destination)}",
             f"method {r.quantize.method}; calibration {r.calibration.samples} x {r.calibration.seq_len} tokens; "
             f"validate {r.validate_.tokens} tokens, window {r.validate_.window}{_extra_measures(r)}", "", "stages:"]
    for s in p.stages:
        mem = f"~{p.memory[s.stage] / 2**20:,.0f} MiB peak" if p.memory.get(s.stage) else ""
        lines.append(f"  {s.stage:<10} {s.status:<8} {mem:<18} {s.why}")
    if p.peak_rss:
        lines.append(f"  peak RSS of this run ~{p.peak_rss / 2**20:,.0f} MiB (the process ~{RUNTIME / 2**20:,.0f} MiB "
                     "+ the largest stage that runs)")
    lines += ["", "outputs (estimated from safetensors headers):"]
    width = max(map(len, p.sizes), default=0)
    for key, size in p.sizes.items():
        lines.append(f"  {key:<{width}} {size}" if isinstance(size, str)
                     else f"  {key:<{width}} {size[0] / 2**20:10.2f} MiB  {size[1]:.3f} bits/weight "
                          f"(nominal {p.nominal[key]:.3f})")
        lines += [f"  {'':<{width}}   {note}" for note in p.notes(key)]
    if p.writes:
        lines += ["", f"space this run writes (estimated from the headers): {space_report(p)}"]
    gates = r.validate_.gates.limits()
    by = " (each judged by its 95 % interval)" if gates and r.validate_.gates.judge_by == "interval" else ""
    lines += ["", "quality gates: " + (", ".join(f"{k} {v}" for k, v in gates.items()) or "none") + by]
    return "\n".join(lines)
