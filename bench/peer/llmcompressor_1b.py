"""Peer side of bench/end_to_end_1b.py: llm-compressor's oneshot GPTQ W4A16 (int4, group 128, symmetric,
lm_head kept) on a model folder, calibrated on the exact token rows quantfab used, saved compressed.

Runs in the peer venv (bench/peer/README.md), never in quantfab's. Prints one JSON line with the wall
seconds of each phase (load, oneshot, save); the caller samples this process's RSS.

    /work/peer-venv/bin/python bench/peer/llmcompressor_1b.py MODEL_DIR ROWS.safetensors OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_llmcompressor import calib_dataset, make_recipe, patch_pin_memory_for_cpu  # noqa: E402


def main() -> None:
    model_dir, rows_path, out_dir = sys.argv[1:4]
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch_pin_memory_for_cpu()
    rows = load_file(rows_path)["input_ids"].numpy()
    phases = {}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    phases["load"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=calib_dataset(rows), recipe=make_recipe("gptq", True, 128),
            num_calibration_samples=int(rows.shape[0]), max_seq_length=int(rows.shape[1]),
            shuffle_calibration_samples=False)
    phases["oneshot"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(out_dir, save_compressed=True)
    phases["save"] = time.perf_counter() - t0
    print(json.dumps({"phases": phases, "rows": list(rows.shape), "threads": torch.get_num_threads()}), flush=True)


if __name__ == "__main__":
    main()
