"""Speed beside quality (validate.speed): llama.cpp's llama-bench on each GGUF output and an F16 reference file.

Prompt processing (pp: ``prompt_tokens`` in one batch) and generation (tg: ``generated_tokens`` one at a time),
tokens per second averaged over ``repetitions`` runs with their standard deviation, as llama-bench reports them,
on this machine, with the threads stated. The reference is the unquantized model written as an F16 GGUF by the
same converter as the outputs. llama-bench comes from $QUANTFAB_LLAMA_CPP_TOOLS (the folder
bench/consumers/build_llama_cpp_tools.sh fills) or PATH; where there is none, the report says so and nothing
fails. validate keys on the tool's sha256, so a rebuilt llama.cpp measures again.

llama.cpp repacks weights for the CPU's widest kernels by default (``repack``); on a CPU that reports AMX while the
OS does not grant its tile state it dies by a signal, and the file is measured again without repacking, which the
report says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from quantfab.tasks.convert.gguf import GGUFOptions
from quantfab.tasks.convert.stage import OutputJob, convert_output
from quantfab.tasks.download import materialize
from quantfab.tasks.errors import UserError
from quantfab.tasks.manifests import ConvertManifest, FormatFile, ModelManifest
from quantfab.tasks.store import Store

TOOL = "llama-bench"
TIMEOUT_S = 3600  # one file's repetitions; a 70B F16 on a CPU takes minutes per run


def find_llama_bench() -> Path | None:
    folder = os.environ.get("QUANTFAB_LLAMA_CPP_TOOLS")
    if folder and (Path(folder) / TOOL).is_file():
        return Path(folder) / TOOL
    found = shutil.which(TOOL)
    return Path(found) if found else None


def tool_digest() -> str | None:
    """sha256 of the llama-bench validate would run (None where there is none): part of validate's key."""
    tool = find_llama_bench()
    return hashlib.sha256(tool.read_bytes()).hexdigest() if tool else None


REFERENCE = "F16 (unquantized)"


def measure_speed(model: ModelManifest, converted: ConvertManifest, outputs: list, spec, expected_tool: str | None,
                  store: Store) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """The settings and machine of the measurement (or why none was made), and each GGUF output's figures; the
    reference file's are under ``REFERENCE`` in the first."""
    files = {o.key: converted.files[o.key] for o in outputs if o.format == "gguf"}
    if not files:
        return {"skipped": f"no GGUF output ({TOOL} measures GGUF files)"}, {}
    tool = find_llama_bench()
    if tool is None or expected_tool is None:
        return {"skipped": f"{TOOL} not found (put it on PATH or set QUANTFAB_LLAMA_CPP_TOOLS to its folder; "
                           "bench/consumers/build_llama_cpp_tools.sh builds it)"}, {}
    if hashlib.sha256(tool.read_bytes()).hexdigest() != expected_tool:
        raise UserError(f"{tool}: changed after this build's cache keys were computed: run the build again")
    if spec.reference:
        files = {REFERENCE: convert_output(OutputJob(model, None, GGUFOptions(type="F16"), "reference", store.url)),
                 **files}
    figures: dict[str, dict[str, float]] = {}
    machine: dict[str, Any] = {}
    notes: set[str] = set()
    for key, f in files.items():
        figures[key], machine = bench(tool, _path(store, f), spec)
        notes |= {machine.pop("note")} if "note" in machine else set()
    if notes:
        machine["note"] = "; ".join(sorted(notes))
    described = {"settings": {"prompt_tokens": spec.prompt_tokens, "generated_tokens": spec.generated_tokens,
                              "repetitions": spec.repetitions}, "machine": machine}
    if spec.reference:
        described["reference"] = {**figures.pop(REFERENCE), "bits_per_weight": files[REFERENCE].bits_per_weight}
    return described, figures


def _path(store: Store, f: FormatFile) -> Path:
    return materialize(store, f.files).path / f.path


def bench(tool: Path, path: Path, spec) -> tuple[dict[str, float], dict[str, Any]]:
    """llama-bench's pp and tg tokens/s (mean and standard deviation over the repetitions) of one GGUF file, and
    what it ran on (build, backends, CPU and GPU, threads, whether weights were repacked)."""
    args = [str(tool), "-m", str(path), "-p", str(spec.prompt_tokens), "-n", str(spec.generated_tokens),
            "-r", str(spec.repetitions), "-o", "json"]
    if spec.threads is not None:
        args += ["-t", str(spec.threads)]
    done = _run(args, path, spec.repack)
    note = ""
    if done.returncode < 0 and spec.repack:
        note = f"repacking off: {TOOL} died by signal {-done.returncode} with it on"
        done = _run(args, path, False)
    if done.returncode != 0:
        raise UserError(f"{TOOL} failed on {path.name} (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    try:
        runs = json.loads(done.stdout)
        pp = next(r for r in runs if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r for r in runs if r["n_gen"] > 0 and r["n_prompt"] == 0)
    except (ValueError, StopIteration, KeyError, TypeError):
        raise UserError(f"{TOOL} on {path.name}: its JSON output lacks a pp and a tg result: "
                        f"{done.stdout.strip()[:400]}") from None
    figures = {"prompt_tokens_per_s": float(pp["avg_ts"]), "prompt_tokens_per_s_sd": float(pp["stddev_ts"]),
               "generation_tokens_per_s": float(tg["avg_ts"]), "generation_tokens_per_s_sd": float(tg["stddev_ts"])}
    machine = {k: pp.get(k) for k in ("build_commit", "backends", "cpu_info", "gpu_info", "n_threads", "repack")}
    return figures, {**machine, **({"note": note} if note else {})}


def _run(args: list[str], path: Path, repack: bool) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*args, "--repack", "1" if repack else "0"], capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UserError(f"{TOOL} on {path.name} ran past {TIMEOUT_S} s: lower validate.speed's token counts or "
                        "repetitions") from None
