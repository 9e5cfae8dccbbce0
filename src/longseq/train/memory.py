"""Device memory of a training step, known before the first step: XLA's own memory analysis of the
compiled step, split into what it holds.

    params        the parameters (their shards under FSDP)                      bytes per device
    optimizer     the optimizer state (Adam's moments, counters)
    other inputs  the batch and the non-parameter model state
    temporaries   activations kept for the backward pass, workspace, gradients
    fft workspace the scratch cuFFT asks for when it runs, outside XLA's analysis: estimated as twice the
                  complex side of the step's largest FFT (on an H200, from 16K to 1M tokens, the allocator's
                  peak exceeded XLA's analysis by 1.0–3.0 times that complex side; by exactly 2 at
                  power-of-two lengths)
    outputs       the step's outputs that do not reuse a donated input (metrics)

    host          pinned host memory the step uses (activations offloaded by train.remat=offload)

`total` is the sum of the device parts: XLA on GPUs allocates the step's temporaries as one buffer of the
reported size, beside the arguments and outputs (donated state reuses its buffers). The trainer prints `MemoryReport.line()` and calls `check()` before it allocates anything; `longseq plan`
prints the same report for any config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np

from longseq.config import Config, ConfigError

GIB = 2**30


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def per_device_bytes(abstract: Any, shardings: Any | None) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs placed with `shardings` (None: whole)."""
    leaves = jax.tree.leaves(abstract)
    placed = [None] * len(leaves) if shardings is None else jax.tree.leaves(shardings)
    total = 0
    for leaf, sharding in zip(leaves, placed, strict=True):
        shape = leaf.shape if sharding is None else sharding.shard_shape(leaf.shape)
        itemsize = 8 if _is_key(leaf) else np.dtype(leaf.dtype).itemsize  # a threefry key: 2 × uint32
        total += int(np.prod(shape)) * itemsize
    return total


def _is_key(leaf: Any) -> bool:
    return jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


class DoesNotFit(ConfigError):
    """A train step needs more memory than the device has (`MemoryReport.check`)."""

    def __init__(self, message: str, report: MemoryReport):
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device of a compiled train step (module docstring), and the device's memory."""

    params: int
    optimizer: int
    other_inputs: int
    temporaries: int
    outputs: int
    device_bytes: int | None  # the device's memory (None where unknown, e.g. CPU)
    device: str
    host: int = 0  # pinned host memory (offloaded activations)
    fft_workspace: int = 0  # cuFFT's scratch at run time (estimated: twice the step's largest FFT)

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.other_inputs + self.temporaries + self.outputs + self.fft_workspace

    def line(self) -> str:
        of = f" of {_size(self.device_bytes)}" if self.device_bytes else ""
        return (f"memory per device: params {_size(self.params)}, optimizer {_size(self.optimizer)}, batch and "
                f"state {_size(self.other_inputs)}, activations and temporaries {_size(self.temporaries)}"
                + (f", FFT workspace {_size(self.fft_workspace)}" if self.fft_workspace else "") + ": "
                f"total {_size(self.total)}{of} ({self.device})"
                + (f"; offloaded to host memory: {_size(self.host)}" if self.host else ""))

    def check(self, config: Config) -> None:
        """Refuse (DoesNotFit, a ConfigError) a step that needs more than the device has, or more pinned host
        memory than the host allocator may give, naming what would help."""
        limit = host_memory_limit()
        if self.host > limit:
            raise DoesNotFit(f"train.remat: the step offloads {self.host / GIB:.1f} GiB to host memory, more than "
                             f"the {limit / GIB:.1f} GiB the host allows ({HOST_LIMIT_VARIABLE} raises XLA's "
                             "pinned host allocator limit, up to the machine's memory); offload fewer activations "
                             "(train.remat_save), shorten data.seq_len or split the sequence (mesh.seq_q / "
                             "mesh.seq_kv)", self)
        if not self.device_bytes or self.total <= self.device_bytes:
            return
        helps = []
        if config.train.remat in ("none", "save_dots"):
            helps.append(f"train.remat=full (now {config.train.remat})")
        from longseq.data import TASKS

        if TASKS[config.data.task].kind == "lm" and config.train.loss_chunk is None:
            helps.append("train.loss_chunk (now unset), so the [batch, seq, vocab] logits never exist")
        helps.append(f"mesh.fsdp (now {config.mesh.fsdp}) for the parameters and optimizer state")
        helps.append(f"mesh.seq_q / mesh.seq_kv (now {config.mesh.seq_q} × {config.mesh.seq_kv}) to split the sequence")
        helps.append(f"a smaller data.batch_size (now {config.data.batch_size}) or data.seq_len (now {config.data.seq_len})")
        raise DoesNotFit(f"train: one step needs {self.total / GIB:.1f} GiB per device, more than the "
                         f"{self.device_bytes / GIB:.1f} GiB of {self.device} ({self.line()}). What lowers it: "
                         + "; ".join(helps), self)


_FFT = re.compile(r"= (\w+)\[([\d,]*)\][^=]* fft\(.*fft_type=(\w+), fft_length=\{([\d,]+)\}")


def largest_fft_bytes(hlo_text: str) -> int:
    """Bytes of the complex side of the largest FFT in a compiled module's HLO text (0 without FFTs): the
    measure of the scratch cuFFT allocates at run time, which XLA's memory analysis leaves out."""
    largest = 0
    for dtype, dims, kind, lengths in _FFT.findall(hlo_text):
        shape = [int(d) for d in dims.split(",") if d]
        length = [int(n) for n in lengths.split(",")]
        batch = math.prod(shape[:len(shape) - len(length)])
        if kind in ("RFFT", "IRFFT"):  # the complex side holds n // 2 + 1 values along the last axis
            complex_values = batch * math.prod(length[:-1]) * (length[-1] // 2 + 1)
        else:
            complex_values = math.prod(shape)
        itemsize = 16 if dtype in ("c128", "f64") else 8
        largest = max(largest, complex_values * itemsize)
    return largest


HOST_LIMIT_VARIABLE = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
DEFAULT_HOST_LIMIT_GB = 64  # XLA's GPU client caps its pinned host allocator at this without the variable


def host_memory_limit() -> int:
    """Bytes of pinned host memory a step may use: XLA's host allocator limit (HOST_LIMIT_VARIABLE, in GiB,
    default DEFAULT_HOST_LIMIT_GB), and never more than the machine's physical memory."""
    limit = float(os.environ.get(HOST_LIMIT_VARIABLE, DEFAULT_HOST_LIMIT_GB)) * GIB
    try:
        limit = min(limit, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not a POSIX system: the allocator's limit alone
        pass
    return int(limit)


def memory_report(compiled: Any, abstract_state: Any, state_sharding: Any | None,
                  device: jax.Device | None = None) -> MemoryReport:
    """The report of a compiled train step whose first argument is the state {"params", "opt_state",
    "rest"} (abstract_state: its ShapeDtypeStructs, placed with state_sharding)."""
    analysis = compiled.memory_analysis()
    shardings = state_sharding or {name: None for name in abstract_state}
    params = per_device_bytes(abstract_state["params"], shardings["params"])
    optimizer = per_device_bytes(abstract_state["opt_state"], shardings["opt_state"])
    device = device or jax.local_devices()[0]  # one this process can read
    stats = device.memory_stats() or {}
    return MemoryReport(
        params=params, optimizer=optimizer,
        other_inputs=max(analysis.argument_size_in_bytes - params - optimizer, 0),
        temporaries=analysis.temp_size_in_bytes,
        outputs=max(analysis.output_size_in_bytes - analysis.alias_size_in_bytes, 0),
        device_bytes=stats.get("bytes_limit"), device=device.device_kind,
        host=analysis.host_temp_size_in_bytes + analysis.host_argument_size_in_bytes
        + analysis.host_output_size_in_bytes - analysis.host_alias_size_in_bytes,
        fft_workspace=2 * largest_fft_bytes(compiled.as_text()))
