"""What the device can do, decided in one place: matmul precision, native bf16, peak FLOP/s, memory.

`tdiff train`, `sample` and `eval` all call `configure_matmul_precision`, so float32 matrix products
run the same way in training and in evaluation (TF32 on CUDA, as the reference trains).
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

import torch

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched in order
# against torch.cuda.get_device_name(): the more specific names come first ("H100 PCIe" before "H100").
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 4090", 165.2),
    ("RTX A6000", 154.8),
)


def configure_matmul_precision() -> None:
    """TF32 for float32 matmuls and convolutions on Ampere and newer GPUs; no effect on the CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def _cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (Linux); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / ARM
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16() -> bool:
    """True where bf16 matrix products run in hardware: AVX512-BF16 or AMX on x86, BF16 on ARM (Apple M2+).

    Without it PyTorch emulates bf16 and a bf16 matmul is about 100x slower than float32.
    """
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and hasattr(cpu, "_is_avx512_bf16_supported"):
        if cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported():
            return True
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return True  # Apple silicon from M2 on; M1 emulates, but its float32 path is slow there too
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast pays on `device`: CUDA with bf16 support, or a CPU with bf16 instructions."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return True


def precision_is_native(device: torch.device, precision: str) -> bool:
    """Whether autocast to `precision` (no, bf16, fp16) runs in hardware on `device`. A CPU does fp16
    matrix products natively only with AVX512-FP16 or AMX-FP16; without, fp16 is emulated like bf16."""
    if precision == "bf16":
        return bf16_is_native(device)
    if precision == "fp16" and device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_fp16", "amx_fp16"})
    return True


def default_inference_precision(device: torch.device) -> str:
    """The precision `tdiff sample` and `eval` run the network in when none is asked for: bf16 where it
    is native (a GPU from Ampere on, a CPU with AVX512-BF16/AMX), float32 ("no") everywhere else."""
    return "bf16" if bf16_is_native(device) else "no"


def slow_precision_warning(device: torch.device, precision: str) -> str | None:
    """One line for a user who asks for bf16 or fp16 where it is emulated; None when it is fine."""
    if precision == "no" or precision_is_native(device, precision):
        return None
    flags = "avx512_bf16/amx_bf16" if precision == "bf16" else "avx512_fp16/amx_fp16"
    return (
        f"this {device.type.upper()} has no native {precision} (no {flags}): {precision} autocast is "
        "emulated and runs far slower than float32 (about 100x for matrix products); "
        "--mixed-precision no is faster here"
    )


def dense_bf16_peak_tflops(device: torch.device) -> tuple[float, str] | None:
    """(peak TFLOP/s, device name) of a known GPU, for MFU; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in DENSE_BF16_PEAK_TFLOPS:
        if key in name:
            return peak, name
    return None


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host array (numpy or tensor) on `device`; pinned and asynchronous on CUDA, so the host does not
    wait for the device's queue. The one host-to-device copy of the training input pipeline."""
    tensor = torch.as_tensor(array)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the kernel at once.

    A CPU training step frees and reallocates the same multi-megabyte buffers every time; with glibc's
    defaults each of them comes back as fresh pages, thousands of page faults per step (the batched
    augmentation ran 25-30 % faster without them). The process keeps up to 1 GiB of freed heap for
    reuse. Linux with glibc only (a no-op returning False elsewhere); called by the CPU training paths.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_TRIM_THRESHOLD (-1): free heap kept before trimming; M_MMAP_THRESHOLD (-3): requests at most this
        # size come from the reusable heap rather than a fresh mmap (32 MiB: glibc's ceiling on 64 bits).
        return bool(libc.mallopt(-1, 1 << 30) and libc.mallopt(-3, 32 << 20))
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: for timing only, never in the training step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bytes(device: torch.device) -> int | None:
    """Total memory of `device`: physical memory for the CPU, the GPU's own for CUDA; None where unknown
    (meta, MPS, a system without sysconf). The total, not what is free now: it decides what can never fit."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # Windows has no sysconf; some systems lack the names
            return None
    return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    """Peak tensor memory since the last reset on CUDA (max_memory_allocated); None on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def describe(device: torch.device) -> str:
    """One line naming the device and whether bf16 is native on it, for benchmark and `params` output."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}; native bf16: {'yes' if bf16_is_native(device) else 'no (emulated, slow)'}"
