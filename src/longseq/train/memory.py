"""Device memory of a training step, known before the first step: XLA's own memory analysis of the
compiled step, split into what it holds.

    params        the parameters (their shards under FSDP)                      bytes per device
    optimizer     the optimizer state (Adam's moments, counters)
    other inputs  the batch and the non-parameter model state
    temporaries   activations kept for the backward pass, workspace, gradients
    outputs       the step's outputs that do not reuse a donated input (metrics)

`total` is the sum of the parts: XLA on GPUs allocates the step's temporaries as one buffer of the
reported size, beside the arguments and outputs (donated state reuses its buffers). The trainer prints `MemoryReport.line()` and calls `check()` before it allocates anything; `longseq plan`
prints the same report for any config.
"""

from __future__ import annotations

import dataclasses
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

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.other_inputs + self.temporaries + self.outputs

    def line(self) -> str:
        of = f" of {_size(self.device_bytes)}" if self.device_bytes else ""
        return (f"memory per device: params {_size(self.params)}, optimizer {_size(self.optimizer)}, batch and "
                f"state {_size(self.other_inputs)}, activations and temporaries {_size(self.temporaries)}: "
                f"total {_size(self.total)}{of} ({self.device})")

    def check(self, config: Config) -> None:
        """Refuse (DoesNotFit, a ConfigError) a step that needs more than the device has, naming what would help."""
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
        device_bytes=stats.get("bytes_limit"), device=device.device_kind)
