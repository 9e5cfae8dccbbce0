"""What a config will run, worked out before running it (`longseq plan CONFIG [overrides]`).

Sequence parallelism: the config's attention call as a cost-model problem (`longseq.parallel.cost`),
the machine's figures (the device kind's preset, overridden by `mesh.node_size`, `mesh.intra_node_gbps`,
`mesh.inter_node_gbps`), the predicted time of every strategy on every grid of the mesh's
seq_q × seq_kv sequence devices, and the strategy and grid the run uses: the configured ones, or with
`model.attention_parallel: auto` the fastest that fits.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from longseq.config import BACKWARD_FROM_STATISTICS, Config, ConfigError
from longseq.parallel import cost
from longseq.parallel.plan import keeps_zigzag_order

class SequenceParallelChoice(NamedTuple):
    """The strategy and Pq × Pkv grid a run uses, and the predictions they were chosen from."""

    strategy: str
    grid: tuple[int, int]
    candidates: tuple[cost.Prediction, ...]
    system_name: str
    problem: cost.Problem | None
    keep_gathered: bool = False  # model.attention_keep_gathered: the attention2d rows keep their blocks


def attention_problem(config: Config, devices: int = 1) -> cost.Problem:
    """One attention layer's call per data-parallel shard: the batch of one mesh.data × mesh.fsdp group
    (mesh.data=-1: the `devices` the other axes leave)."""
    from longseq.data import TASKS

    model = config.model
    fsdp = config.mesh.fsdp
    data = config.mesh.data if config.mesh.data > 0 else max(devices // (config.mesh.seq_devices * fsdp), 1)
    data_devices = data * fsdp
    causal = TASKS[config.data.task].kind == "lm"
    zigzag = causal and keeps_zigzag_order(model.layer_mixers(), config.data.seq_len, config.mesh.seq_devices)
    return cost.Problem(batch=max(config.data.batch_size // data_devices, 1), seq=config.data.seq_len,
                        heads=model.num_heads, kv_heads=model.num_kv_heads or model.num_heads,
                        head_dim=model.d_model // model.num_heads,
                        itemsize=2 if model.compute_dtype == "bfloat16" else 4,
                        causal=causal, order="zigzag" if zigzag else "natural")


def system_preset(device_kind: str, platform: str) -> str:
    """The name of the cost-model preset for a device ("h100", "h200", or "cpu")."""
    kind = device_kind.lower()
    if "h200" in kind:
        return "h200"
    if platform == "gpu" or "h100" in kind:
        return "h100"
    return "cpu"


def system_for(config: Config, device_kind: str, platform: str) -> tuple[str, cost.System]:
    """The preset for the device, with the mesh section's overrides applied; (name, System)."""
    name = system_preset(device_kind, platform)
    system = cost.SYSTEMS[name]
    overrides = {}
    if config.mesh.node_size is not None:
        overrides["node_size"] = config.mesh.node_size
    if config.mesh.intra_node_gbps is not None:
        overrides["intra_bandwidth"] = config.mesh.intra_node_gbps * 1e9
    if config.mesh.inter_node_gbps is not None:
        overrides["inter_bandwidth"] = config.mesh.inter_node_gbps * 1e9
    if overrides:
        name += " (" + ", ".join(f"{key}={value:g}" for key, value in overrides.items()) + ")"
    return name, dataclasses.replace(system, **overrides)


def sequence_parallel_choice(config: Config, device_kind: str | None = None,
                             platform: str | None = None) -> SequenceParallelChoice:
    """The strategy and grid the run uses (auto: the fastest prediction that fits), with the table.

    device_kind, platform: of the devices the run will use (default: jax.devices()[0]'s).
    """
    model, mesh = config.model, config.mesh
    grid = (mesh.seq_q, mesh.seq_kv)
    if mesh.seq_devices == 1 or "attention" not in model.layer_mixers() or model.attention_parallel == "none":
        strategy = "attention2d" if model.attention_parallel == "auto" else model.attention_parallel
        return SequenceParallelChoice(strategy, grid, (), "", None)
    import jax

    if device_kind is None or platform is None:
        device_kind, platform = jax.devices()[0].device_kind, jax.devices()[0].platform
    name, system = system_for(config, device_kind, platform)
    problem = attention_problem(config, jax.device_count())
    allowed = tuple(s for s in cost.STRATEGIES
                    if not (config.kernels.attention == "xla" and s in BACKWARD_FROM_STATISTICS))
    keep = model.attention_keep_gathered
    candidates = tuple(cost.candidates(mesh.seq_devices, problem, system, allowed, keep_gathered=keep))
    if model.attention_parallel == "auto":
        best = cost.choose(mesh.seq_devices, problem, system, allowed, keep_gathered=keep)
        return SequenceParallelChoice(best.strategy, best.grid, candidates, name, problem, keep)
    return SequenceParallelChoice(model.attention_parallel, grid, candidates, name, problem, keep)


def format_choice(choice: SequenceParallelChoice, configured: str) -> str:
    """The table of predictions, fastest first, and the line saying what runs."""
    if not choice.candidates:
        return f"sequence parallelism: {choice.strategy} on {choice.grid[0]}x{choice.grid[1]} (nothing to choose)"
    p = choice.problem
    lines = [f"attention per call: batch {p.batch}, seq {p.seq}, heads {p.heads}/{p.kv_heads} kv, head_dim "
             f"{p.head_dim}, {'causal' if p.causal else 'bidirectional'}, {p.itemsize}-byte values; "
             f"system {choice.system_name}",
             "",
             "| strategy | grid | predicted ms | compute ms | exposed comm ms | MiB sent/device | memory MiB | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for c in choice.candidates:
        mark = " ←" if (c.strategy, c.grid) == (choice.strategy, tuple(choice.grid)) else ""
        kept = " (keep_gathered)" if choice.keep_gathered and c.strategy == "attention2d" else ""
        lines.append(f"| {c.strategy}{kept}{mark} | {c.grid[0]}x{c.grid[1]} | {c.time * 1e3:.3f} | {c.compute * 1e3:.3f} | "
                     f"{c.communication * 1e3:.3f} | {c.bytes_sent / 2**20:.1f} | {c.memory / 2**20:.1f} | "
                     f"{'yes' if c.fits else 'no'} |")
    how = "chosen by the cost model (attention_parallel=auto)" if configured == "auto" else "as configured"
    lines += ["", f"sequence parallelism: {choice.strategy} on {choice.grid[0]}x{choice.grid[1]}, {how}"]
    return "\n".join(lines)


def memory_plan(config: Config, choice: SequenceParallelChoice) -> str:
    """The trainer's memory line for `config` on this process's devices (the step compiled from shapes:
    nothing is allocated), plus why `longseq train` would refuse it, if it would."""
    from longseq import data as data_lib
    from longseq.train.trainer import Steps, make_mesh

    try:
        mesh = make_mesh(config, choice.grid)
    except ConfigError as error:
        return f"memory per device: not compiled on this machine: {error}"
    task = data_lib.make_task(config.data)
    steps = Steps(config, task, mesh, strategy=choice.strategy)
    _, report = steps.compile_train_step(mesh, task.batch("train", 0, config.data.batch_size))
    try:
        report.check(config)
    except ConfigError as error:
        return f"{report.line()}\ndoes not fit: {error}"
    return report.line()
