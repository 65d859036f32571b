"""GB/s of every pack and verify kernel, beside an equivalent torch implementation on the same device.

On a CUDA machine (CuPy installed) the kernels run on device-resident arrays and are timed with CUDA
events, against torch on the same GPU and against the device's peak memory bandwidth (from its clock and
bus width where the driver reports them, and a measured device-to-device copy either way). Without one,
the same rows run the NumPy references and the g++ build of the .cu sources (one core, a logic check
more than a speed one) against torch on the CPU. Bytes counted are what a kernel must read and write
once: codes in and words out for pack; packed words, scales and the expected float32 in for verify.

    python bench/kernel_throughput.py                 # auto: CuPy if a GPU is present
    python bench/kernel_throughput.py --rows 8192 --cols 8192 --repeat 20
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from quantfab.kernels import gguf_blocks, nf4, words
from quantfab.kernels.backends import backend_named, cuda_available
from quantfab.kernels.words import PackedInts, WordLayout
from quantfab.tasks.quantize.grids import GRIDS, Encoded, NF4Grid, grid_named

GPTQ = WordLayout(4, 1, False, 8)
AWQ = WordLayout(4, 0, True, 8, (0, 2, 4, 6, 1, 3, 5, 7))


def timed(fn: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``repeat`` calls after one warm-up (which also compiles)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def torch_pack_int4_cols(codes: torch.Tensor) -> torch.Tensor:
    """GPTQ qweight in torch: eight 4-bit codes per int32 along the input dim, stored (words, rows)."""
    u = (codes.to(torch.int32) + 8).reshape(codes.shape[0], -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    return (u << shifts).sum(dim=-1, dtype=torch.int32).T.contiguous()


def torch_pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    c = codes.reshape(-1, 2).to(torch.uint8)
    return (c[:, 0] << 4) | c[:, 1]


def torch_pack_q4_0(codes: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    u = (codes.to(torch.int16) + 8).to(torch.uint8).reshape(-1, 32)
    nib = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
    return torch.cat([d.reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2), nib], dim=1)


def torch_verify_int4(words_t: torch.Tensor, scales: torch.Tensor, expected: torch.Tensor, group: int) -> tuple:
    """Decode GPTQ-layout words (symmetric) and compare: what verify_words does, as torch ops."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words_t.device)
    q = ((words_t.T.unsqueeze(-1) >> shifts) & 15).reshape(expected.shape).to(torch.float32) - 8
    decoded = scales.repeat_interleave(group, dim=1) * q
    bad = decoded != expected
    return (decoded - expected).abs().max().item(), int(bad.sum().item())


def rows_of_results(rows: int, cols: int, repeat: int, device_name: str) -> list[tuple[str, str, float, int]]:
    """(kernel, implementation, seconds, bytes) for every case on this machine."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    int4 = grid_named("INT4_G128_SYM")
    enc_i = int4.reference(w)
    enc_q = GRIDS["Q4_0"].reference(w)
    nf = grid_named("NF4_B64")
    enc_n = nf.reference(w)
    expected_i, expected_q, expected_n = int4.decode(enc_i), GRIDS["Q4_0"].decode(enc_q), nf.decode(enc_n)
    n = rows * cols
    gpu = device_name == "cuda"
    be = backend_named("cupy" if gpu else "cpu")
    xp = be.xp
    sync_k: Callable[[], None] = (lambda: xp.cuda.Device().synchronize()) if gpu else (lambda: None)
    sync_t: Callable[[], None] = torch.cuda.synchronize if gpu else (lambda: None)
    def dev(a: np.ndarray) -> Any:
        return be.to_device(a) if gpu else a

    tdev = torch.device(device_name)

    codes_d, codes_q_d, codes_n_d = dev(enc_i.codes), dev(enc_q.codes), dev(enc_n.codes.astype(np.uint8))
    words_np = words.pack_words_reference(enc_i.codes, GPTQ)
    packed_i = PackedInts(dev(words_np), GPTQ, dev(enc_i.d.astype(np.float32)), 128)
    q4_bytes = gguf_blocks.PACKERS["Q4_0"](enc_q)
    nf4_bytes = nf4.pack_nf4_reference(enc_n.codes)
    exp_i, exp_q, exp_n = dev(expected_i), dev(expected_q), dev(expected_n.reshape(-1))
    enc_q_dev = Encoded(codes_q_d, dev(enc_q.d), None)
    sizes = {
        "pack int4 (GPTQ words)": n + n // 2,
        "pack int4 (AWQ interleaved)": n + n // 2,
        "pack NF4 nibbles": n + n // 2,
        "pack GGUF Q4_0 blocks": n + n // 32 * 4 + n // 32 * 18,
        "verify int4 words": n // 2 + n // 128 * 4 + n * 4,
        "verify NF4": n // 2 + n // 64 * 4 + n * 4,
        "verify GGUF Q4_0": n // 32 * 18 + n * 4,
    }
    kernel_cases: dict[str, Callable[[], Any]] = {
        "pack int4 (GPTQ words)": lambda: words.pack_words(codes_d, GPTQ),
        "pack int4 (AWQ interleaved)": lambda: words.pack_words(codes_d, AWQ),
        "pack NF4 nibbles": lambda: nf4.pack_nf4(codes_n_d),
        "pack GGUF Q4_0 blocks": lambda: gguf_blocks.pack_gguf("Q4_0", enc_q_dev),
        "verify int4 words": lambda: words.verify_words(packed_i, exp_i),
        "verify NF4": lambda: nf4.verify_nf4(dev(nf4_bytes), dev(enc_n.d.reshape(-1)), NF4Grid.CODEBOOK, 64, exp_n),
        "verify GGUF Q4_0": lambda: gguf_blocks.verify_gguf("Q4_0", dev(q4_bytes), exp_q),
    }
    t_codes = torch.from_numpy(enc_i.codes).to(tdev)
    t_codes_n = torch.from_numpy(enc_n.codes.astype(np.uint8)).to(tdev)
    t_codes_q, t_d_q = torch.from_numpy(enc_q.codes).to(tdev), torch.from_numpy(enc_q.d).to(tdev)
    t_words, t_scales = torch.from_numpy(words_np).to(tdev), torch.from_numpy(enc_i.d).to(tdev)
    t_exp = torch.from_numpy(expected_i).to(tdev)
    torch_cases: dict[str, Callable[[], Any]] = {
        "pack int4 (GPTQ words)": lambda: torch_pack_int4_cols(t_codes),
        "pack NF4 nibbles": lambda: torch_pack_nf4(t_codes_n),
        "pack GGUF Q4_0 blocks": lambda: torch_pack_q4_0(t_codes_q, t_d_q),
        "verify int4 words": lambda: torch_verify_int4(t_words, t_scales, t_exp, 128),
    }
    out = []
    for name, fn in kernel_cases.items():
        os.environ["QUANTFAB_KERNELS"] = be.name
        out.append((name, f"kernel ({be.name})", timed(fn, repeat, sync_k), sizes[name]))
        if not gpu:  # the same host call answered by the NumPy reference
            os.environ["QUANTFAB_KERNELS"] = "numpy"
            out.append((name, "NumPy reference", timed(fn, repeat, lambda: None), sizes[name]))
        if name in torch_cases:
            out.append((name, f"torch ({device_name})", timed(torch_cases[name], repeat, sync_t), sizes[name]))
    return out


def device_peak() -> tuple[str, float | None, float]:
    """(device name, peak GB/s from the driver's clock and bus width or None, measured D2D copy GB/s)."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    peak = None
    try:
        clock_khz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMemoryClockRate, 0)
        bus_bits = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrGlobalMemoryBusWidth, 0)
        peak = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    except Exception:  # CUDA 13 drivers may no longer report these
        peak = None
    a = cupy.empty(1 << 30, cupy.uint8)
    b = cupy.empty_like(a)
    secs = timed(lambda: b.__setitem__(slice(None), a), 10, cupy.cuda.Device().synchronize)
    return props["name"].decode(), peak, 2 * a.nbytes / secs / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="default 8192 on a GPU, 2048 on the CPU")
    ap.add_argument("--cols", type=int, default=None, help="default 8192 on a GPU, 2048 on the CPU")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per case (median); default 20 GPU / 3 CPU")
    args = ap.parse_args()
    gpu = cuda_available()
    rows = args.rows or (8192 if gpu else 2048)
    cols = args.cols or (8192 if gpu else 2048)
    repeat = args.repeat or (20 if gpu else 3)
    peak = copy = None
    if gpu:
        name, peak, copy = device_peak()
        print(f"device: {name}; peak {peak and f'{peak:.0f} GB/s' or 'not reported'}; "
              f"device-to-device copy {copy:.0f} GB/s")
    else:
        print(f"no CUDA device: kernels run as the g++ build on one core; torch on {torch.get_num_threads()} threads")
    print(f"tensor {rows} x {cols} ({rows * cols / 1e6:.1f}M weights), median of {repeat}\n")
    results = rows_of_results(rows, cols, repeat, "cuda" if gpu else "cpu")
    header = "| kernel | implementation | ms | GB/s |" + (" % of copy | % of peak | × torch |" if gpu else " × torch |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    torch_secs = {k: s for k, impl, s, _ in results if impl.startswith("torch")}
    for kernel, impl, secs, nbytes in results:
        gbs = nbytes / secs / 1e9
        vs_torch = f"{torch_secs[kernel] / secs:.2f}" if kernel in torch_secs and not impl.startswith("torch") else ""
        cells = [kernel, impl, f"{secs * 1e3:.2f}", f"{gbs:.1f}"]
        if gpu:
            cells += [f"{100 * gbs / copy:.0f}" if copy else "", f"{100 * gbs / peak:.0f}" if peak else ""]
        print("| " + " | ".join(cells + [vs_torch]) + " |", flush=True)


if __name__ == "__main__":
    main()
