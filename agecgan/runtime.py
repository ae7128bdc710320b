"""Where a process runs: its device, its precision, and its place in a torchrun process group.

Training and the pipeline both choose the device and the precision here, by one rule:
"auto" takes CUDA when present, and bf16 only where the hardware computes it natively (CUDA
with bf16 support; a CPU with AVX512-BF16 or AMX). Elsewhere bf16 is emulated and slower than
fp32: on a Xeon without those instructions it halved stage 1's speed (README, "Speed").
"""

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class Runtime:
    """Where this process runs: device, distributed rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers, as /proc/cpuinfo gives them
    (a virtual machine's name can be as short as "AMD EPYC"); else platform's."""
    with contextlib.suppress(OSError):
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
            return f"{fields['model name']} ({numbers})"
    import platform

    return platform.processor() or "unknown CPU"


def hardware(device: torch.device) -> str:
    """The machine a run uses, in words, for its options.json and the model card."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} CPUs, {torch.get_num_threads()} threads"


def select_device(name: str = "auto") -> torch.device:
    """ "auto": the GPU when torch sees one, else the CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` computes bf16 in hardware, and what that was decided from."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return True, "the CPU has AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "the CPU has AVX512-BF16"
        return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated)"
    return False, f"no native bf16 rule for {device.type}"


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """ "auto" -> "bf16" or "fp32" by native_bf16; returns (precision, why)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision, "asked for"
    native, why = native_bf16(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


def autocast(device: torch.device, precision: str):
    """bf16 autocast, or nothing for fp32. bf16 keeps fp32's exponent range, so no loss scaling
    is needed (fp16 would need it, and is not offered)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def start_runtime(device: str = "auto") -> Runtime:
    """Join the torchrun process group when launched by torchrun; otherwise one process."""
    if "RANK" not in os.environ:
        return Runtime(select_device(device))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    chosen = select_device(device)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Runtime(chosen, rank, world_size)


def stop_runtime(runtime: Runtime) -> None:
    if runtime.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


def wrap_distributed(network: nn.Module, runtime: Runtime) -> nn.Module:
    """DistributedDataParallel under torchrun, the network itself otherwise."""
    if runtime.world_size == 1:
        return network
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def sync_buffers(network: nn.Module, runtime: Runtime) -> None:
    """Give every rank rank 0's batch-norm statistics (DDP syncs them only before a forward)."""
    if runtime.world_size > 1:
        for buffer in network.buffers():
            dist.broadcast(buffer, src=0)
