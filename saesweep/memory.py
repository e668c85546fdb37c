"""Devices and memory: resolve 'auto', refuse an invisible GPU or a group that cannot fit."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from saesweep.errors import UserError
from saesweep.sae import SAEConfig
from saesweep.sae.registry import architecture

BYTES_PER_PARAM = 4 * 4
"""float32 weights, gradients and two Adam moments."""


def group_bytes(sae_cfgs: list[SAEConfig], d_in: int, batch_size: int) -> int:
    """Estimated peak bytes of training the group: parameter state plus per-batch activations
    (pre-activations, codes and their gradients, a few [batch, d_sae] float32 tensors each)."""
    total = 0
    for cfg in sae_cfgs:
        params, latents, width = architecture(cfg.arch).sizes(cfg, d_in)
        total += params * BYTES_PER_PARAM
        total += 4 * batch_size * latents * 4 + 4 * batch_size * width * 4
    return total


def resolve_device(spec: str, cuda_available: bool | None = None) -> str:
    """The device `spec` names where this runs: 'auto' is 'cuda' when torch sees a GPU here
    (`cuda_available`, default torch's answer), else 'cpu'; any other spec is returned as is.
    Call it where the work runs, never on a machine that only submits it."""
    if spec != "auto":
        return spec
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "cuda" if cuda_available else "cpu"


def is_device_spec(spec: str) -> bool:
    """Whether `spec` is 'auto' or a device string torch accepts ('cpu', 'cuda:1', 'mps')."""
    if spec == "auto":
        return True
    try:
        torch.device(spec)
    except RuntimeError:
        return False
    return True


DEVICE_SPEC = {"check": (is_device_spec, "'auto', 'cpu', 'cuda' or 'cuda:N'")}
"""Field metadata: the value must be a device spec."""


def require_visible_device(device: str | torch.device, named: str, fix: str) -> None:
    """A UserError when `device` is a CUDA device that this torch cannot see; `named` is how
    the user spelled it, `fix` what to do instead."""
    if torch.device(resolve_device(str(device))).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{named} but this torch ({torch.__version__}) sees no CUDA device; {fix}")


def available_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return (
        int(info["MemAvailable"].split()[0]) * 1024
        if "MemAvailable" in info
        else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    )


def check_fits(sae_cfgs: list[SAEConfig], d_in: int, batch_size: int, device: str) -> None:
    need, have = group_bytes(sae_cfgs, d_in, batch_size), available_bytes(device)
    if need > 0.9 * have:
        raise UserError(
            f"this group of {len(sae_cfgs)} SAEs needs about {need / 2**30:.1f} GiB "
            f"on {device} but {have / 2**30:.1f} GiB is available; lower "
            "--max-parallel, the widths or batch_size"
        )


def reuse_freed_memory() -> None:
    """Keep freed host memory in the process for the next step's tensors (glibc only).

    glibc serves every allocation above 32 MiB with fresh mmap pages and unmaps them on free,
    so each training step of a large stack page-faults its temporaries in again; on the
    measured VM that made an 8-SAE TopK step 25 % slower. With mmap off and trimming off,
    freed blocks are reused and the process keeps its peak footprint.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
