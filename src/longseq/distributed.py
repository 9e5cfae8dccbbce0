"""Multi-process (multi-host) runs through JAX's own runtime, `jax.distributed`, set up from the environment.

One process per host (or per GPU), each running the same `longseq train` command. They find each other
through one of:

  - explicit variables, all three: JAX_COORDINATOR_ADDRESS (host:port of process 0),
    JAX_NUM_PROCESSES, JAX_PROCESS_ID (0 … n−1);
  - a cluster JAX detects itself: Slurm (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1), or a
    multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts).

Otherwise the run is single-process and nothing is initialised. Every process builds the same global
mesh over all devices; each feeds only the shards its own devices hold (the batches are a pure function
of the step, so every process can compute them), and only process 0 writes metrics, plots and the
run's config (checkpoints are written by all, through Orbax, which coordinates them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_has_several_processes(environ: Mapping[str, str]) -> bool:
    def count(name: str) -> int:
        value = environ.get(name, "")
        return int(value) if value.isdigit() else 1

    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1 or len(hosts) > 1


def distributed_arguments(environ: Mapping[str, str] = os.environ) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize` the environment asks for, or None for a
    single-process run. Raises ValueError naming a variable that is missing or malformed."""
    given = {name: environ.get(name, "") for name in EXPLICIT}
    if any(given.values()):
        for name, value in given.items():
            if not value:
                raise ValueError(f"{name}: a multi-process run needs all of {', '.join(EXPLICIT)}; "
                                 f"{name} is not set")
        for name in EXPLICIT[1:]:
            if not given[name].isdigit():
                raise ValueError(f"{name}: expected a non-negative integer, got {given[name]!r}")
        num, index = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
        if not 0 <= index < num:
            raise ValueError(f"JAX_PROCESS_ID: expected 0 … {num - 1}, got {index}")
        return dict(coordinator_address=given["JAX_COORDINATOR_ADDRESS"], num_processes=num, process_id=index)
    if _cluster_has_several_processes(environ):
        return {}  # JAX's cluster auto-detection fills everything in
    return None


def initialize_from_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Start `jax.distributed` when the environment describes a multi-process run (see the module
    docstring); a no-op otherwise or when already started. Must run before any JAX computation.
    Returns whether this is a multi-process run."""
    if jax.distributed.is_initialized():
        return True
    arguments = distributed_arguments(environ)
    if arguments is None:
        return False
    # CPU processes exchange collectives through Gloo (GPU and TPU backends use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0
