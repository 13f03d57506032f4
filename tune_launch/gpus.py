"""GPU facts as data, shared by the launcher (plans, `detect`) and the ranks (MFU in the step lines).

Dense bf16 peak FLOP/s per device (no sparsity), looked up by the longest table key found in the device name.
Unknown devices give None, and MFU is then not reported rather than guessed.
"""

from __future__ import annotations

PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores; V100 has no bf16
    "T4": 65e12,
}


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s for a device name, by the longest matching table key; None if unknown."""
    if not gpu_name:
        return None
    hits = [k for k in PEAK_BF16_FLOPS if k.lower() in gpu_name.lower()]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None


def model_flops_utilization(params: int, tokens_per_s: float, devices: int, peak_flops: float | None) -> float | None:
    """6 x parameters x tokens/s (the whole job's) over the devices' summed peak; attention FLOPs not counted."""
    if not peak_flops or devices < 1 or params <= 0:
        return None
    return 6.0 * params * tokens_per_s / (peak_flops * devices)
