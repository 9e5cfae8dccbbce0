"""The training loop: config -> task, model, optimizer -> jit-compiled steps -> run directory.

Read top to bottom: `train()` is the whole run. A run lives in `runs/<name>/`:

    config.yaml         the resolved config (every default spelled out)
    metrics.jsonl       one JSON row per log/eval event
    tensorboard/        the same metrics for TensorBoard
    checkpoints/<step>/ orbax checkpoints of the whole training state (newest few kept)
    metrics.png         train/eval curves, written at the end

Rerunning the same command resumes from the newest checkpoint and reproduces, step for step, the
losses an uninterrupted run would have produced: the data stream is indexed by step, and the
dropout RNG state is part of the checkpoint. Ctrl-C (or SIGTERM) saves a checkpoint before exiting.
A non-finite loss, gradient or parameter stops the run; checkpoints only ever hold finite states.

The training state is a plain pytree, so one `jax.jit` compiles the whole step:
    {"params": {"kernel": <long-conv kernels>, "other": <other parameters>},
     "rest": <non-parameter model state (RNG counters)>, "opt_state": <optax state>}
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from longseq import data as data_lib
from longseq.config import Config, ConfigError, from_dict, to_dict, to_yaml
from longseq.distributed import initialize_from_environment, is_primary
from longseq.layers import ConvKernel
from longseq.layers.remat import Remat, offload_supported
from longseq.models import build_model
from longseq.parallel import SequenceParallel
from longseq.parallel.fsdp import BATCH_AXES, SEQUENCE_AXES, batch_spec, on_mesh, state_shardings
from longseq.plan import format_choice, sequence_parallel_choice
from longseq.train.checkpoint import Checkpointer
from longseq.train.losses import chunked_lm_sums, classification_sums, lm_sums, means
from longseq.train.memory import MemoryReport, memory_report
from longseq.train.metrics import MetricsWriter, plot_metrics
from longseq.train.optimizer import make_optimizer, parameter_groups

# What a checkpoint's meaning depends on: the model (its parameters), the data stream (which batch comes
# at which step) and the schedule's horizon. Everything else (learning rate, clipping, logging) may
# change when a run resumes, e.g. a lower optim.lr after a divergence.
_FIXED_ON_RESUME = ("model", "data", "train.steps")


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the parameters became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C / SIGTERM: a checkpoint was saved; rerunning the same command resumes."""


def run_directory(config: Config) -> Path:
    return Path(config.train.run_dir) / (config.train.name or "run")


def make_mesh(config: Config, grid: tuple[int, int] | None = None) -> jax.sharding.Mesh:
    """The (data, fsdp, seq_q, seq_kv) mesh of `config.mesh` (data=-1: the devices the other axes leave),
    checked against the machine and the batch size; `grid` = (seq_q, seq_kv) replaces the config's
    (attention_parallel=auto chooses it among the factorisations of the same device count)."""
    available = jax.device_count()
    seq, fsdp = config.mesh.seq_devices, config.mesh.fsdp
    data = max(available // (seq * fsdp), 1) if config.mesh.data == -1 else config.mesh.data
    if data * fsdp * seq > available:
        key = "mesh.data" if seq * fsdp == 1 else "mesh"
        raise ConfigError(f"{key}: asks for {data * fsdp * seq} devices (data × fsdp × seq_q × seq_kv = "
                          f"{data} × {fsdp} × {config.mesh.seq_q} × {config.mesh.seq_kv}), but only {available} "
                          f"are available ({jax.devices()[0].platform})")
    if config.data.batch_size % (data * fsdp):
        raise ConfigError(f"data.batch_size: {config.data.batch_size} is not divisible by the "
                          f"{data * fsdp} devices of mesh.data × mesh.fsdp")
    rows, cols = grid or (config.mesh.seq_q, config.mesh.seq_kv)
    if rows * cols != seq:
        raise ValueError(f"grid: {rows}x{cols} does not hold the {seq} sequence devices of the config")
    devices = np.array(jax.devices()[:data * fsdp * seq]).reshape(data, fsdp, rows, cols)
    if config.train.remat == "offload" and not offload_supported(
            [d for d in devices.flat if d.process_index == jax.process_index()]):  # the ones it can ask
        memories = sorted({m.kind for m in jax.local_devices()[0].addressable_memories()})
        raise ConfigError(f"train.remat: offload moves activations to pinned host memory, which these "
                          f"{jax.local_devices()[0].platform} devices do not have (their memories: {', '.join(memories)}); "
                          "use remat=save_named to keep the same activations on the device, or remat=full")
    return jax.sharding.Mesh(devices, (*BATCH_AXES, *SEQUENCE_AXES))


def batch_shardings(mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray]) -> dict[str, NamedSharding]:
    """Each batch array split over data × fsdp along axis 0 and, for [batch, seq] arrays, over the
    sequence grid along axis 1."""
    return {name: NamedSharding(mesh, batch_spec(x.ndim)) for name, x in batch.items()}


# ----------------------------------------------------------------------------------------------
# the model as a pytree of arrays, and the jit-compiled steps

class Steps:
    """The model's structure plus the pure, jit-compiled train and eval steps over the state pytree.

    With a mesh, the state lives split over its `fsdp` axis (`longseq.parallel.fsdp`: replicated when
    mesh.fsdp = 1) from the moment it is made: `init()` computes the initial state in one jit-compiled
    call straight into its shards, so no device ever holds the whole model when fsdp > 1.
    """

    def __init__(self, config: Config, task: Any, mesh: jax.sharding.Mesh | None = None,
                 strategy: str | None = None):
        """strategy: the sequence-parallel attention strategy (None = config.model.attention_parallel,
        which must then not be "auto": `longseq.plan.sequence_parallel_choice` resolves that)."""
        self.kind = task.kind
        self.mesh = mesh
        self.loss_chunk, self.z_loss = config.train.loss_chunk, config.train.z_loss
        sequence_parallel = None
        if mesh is not None and config.mesh.seq_devices > 1:
            sequence_parallel = SequenceParallel(mesh, strategy or config.model.attention_parallel,
                                                 keep_gathered=config.model.attention_keep_gathered)

        def split_model():
            model = build_model(config.model, config.kernels, kind=task.kind, vocab_size=task.vocab_size,
                                num_classes=task.num_classes, seq_len=config.data.seq_len,
                                rngs=nnx.Rngs(params=config.train.seed, dropout=config.train.seed + 1),
                                sequence_parallel=sequence_parallel,
                                remat=Remat(config.train.remat, config.train.remat_save, config.train.mlp_chunk))
            graphdef, kernels, others, rest = nnx.split(model, ConvKernel, nnx.Param, ...)
            # Plain nested dicts of arrays: jax flattens them in C++, where nnx.State's Python flattening
            # costs ~20 µs a leaf on every call of a step (a few ms per step of a 24-layer model).
            return graphdef, {"kernel": nnx.to_pure_dict(kernels), "other": nnx.to_pure_dict(others)}, nnx.to_pure_dict(rest)

        self.graphdef, abstract_params, _ = nnx.eval_shape(split_model)
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_params))
        self.tx = make_optimizer(config.optim, config.train.steps, parameter_groups(abstract_params))

        def initial_state():
            _, params, rest = split_model()
            return {"params": params, "rest": rest, "opt_state": self.tx.init(params)}

        self.abstract_state = jax.eval_shape(initial_state)  # shapes and dtypes, nothing computed
        self.state_sharding = self.metrics_sharding = None
        if mesh is not None:
            self.state_sharding = state_shardings(mesh, self.abstract_state)
            self.metrics_sharding = NamedSharding(mesh, PartitionSpec())
        self._init = jax.jit(initial_state, out_shardings=self.state_sharding)
        self.train_step = jax.jit(self._train_step, donate_argnums=0,
                                  out_shardings=(self.state_sharding, self.metrics_sharding))
        self.eval_step = jax.jit(self._eval_step, out_shardings=self.metrics_sharding)

    def init(self):
        """The initial train state, made on the devices in its shardings. On GPUs its random numbers lower to
        JAX's threefry kernel instead of XLA ops: the same bits, and the unrolled 24-layer ~370M LM's
        initialisation compiles in seconds instead of ~3 minutes on an H200 (the step's own compile is ~25 s;
        experiments/end_to_end/README.md). The flag is part of jit's cache key, so it applies to this call only."""
        previous = jax.config.jax_threefry_gpu_kernel_lowering
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
        try:
            return self._init()
        finally:
            jax.config.update("jax_threefry_gpu_kernel_lowering", previous)

    def compile_train_step(self, mesh: jax.sharding.Mesh, batch: dict[str, np.ndarray]) -> tuple[Any, MemoryReport]:
        """The train step compiled for the state's shardings and batches shaped like `batch` (numpy), from
        shapes alone: nothing is allocated. Returns it (call it as `compiled(state, device_batch)`) and its
        memory report (`longseq.train.memory`)."""
        if self.state_sharding is None:
            raise ValueError("compile_train_step: these Steps were built without a mesh; pass the mesh to Steps")
        state = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                             self.abstract_state, self.state_sharding)
        shardings = batch_shardings(mesh, batch)
        batch = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[name]) for name, x in batch.items()}
        compiled = self.train_step.lower(state, batch).compile()
        return compiled, memory_report(compiled, self.abstract_state, self.state_sharding)

    def _forward(self, params, rest, batch, training: bool):
        """Loss/accuracy sums of one batch, and the updated non-parameter state. The model runs with the
        mesh as JAX's context (`on_mesh`), where the layers place their activations as the batch is
        (`longseq.parallel.fsdp.constrain_to_batch`)."""
        model = nnx.merge(self.graphdef, params["kernel"], params["other"], rest, copy=True)
        model.train() if training else model.eval()
        with on_mesh(self.mesh):
            if self.kind == "lm" and self.loss_chunk:
                sums = chunked_lm_sums(model.hidden(batch["inputs"]), model.head_matrix(), batch["targets"],
                                       batch["weights"], chunk=self.loss_chunk)
            elif self.kind == "lm":
                sums = lm_sums(model(batch["inputs"]), batch["targets"], batch["weights"])
            else:
                sums = classification_sums(model(batch["inputs"], mask=batch["mask"]), batch["labels"])
        return sums, nnx.to_pure_dict(nnx.split(model, ConvKernel, nnx.Param, ...)[3])

    def _train_step(self, state, batch):
        def loss_fn(params):
            sums, rest = self._forward(params, state["rest"], batch, training=True)
            objective = sums["loss_sum"] + self.z_loss * sums["z_sum"] if self.z_loss else sums["loss_sum"]
            return objective / jnp.maximum(sums["weight_sum"], 1.0), (sums, rest)

        (_, (sums, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        metrics = {**sums, "grad_norm": optax.tree.norm(grads), "params_finite": finite}
        return {"params": params, "rest": rest, "opt_state": opt_state}, metrics

    def _eval_step(self, state, batch):
        return self._forward(state["params"], state["rest"], batch, training=False)[0]

    def evaluate(self, state, eval_batches) -> dict[str, float]:
        totals = None
        for batch in eval_batches:
            sums = self.eval_step(state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        return means(jax.device_get(totals))


# ----------------------------------------------------------------------------------------------
# the run directory

def _prepare_run_directory(config: Config, run_dir: Path) -> list[str]:
    """Create the run dir and save config.yaml. When it holds checkpoints, refuse a config whose
    model, data or horizon differ from theirs, and return the other changed keys (`key: old -> new`)."""
    saved_path = run_dir / "config.yaml"
    has_checkpoint = any(p.name.isdigit() for p in (run_dir / "checkpoints").glob("*"))
    changes = []
    if saved_path.exists() and has_checkpoint:
        saved = _flatten_dict(to_dict(from_dict(Config, yaml.safe_load(saved_path.read_text()))))
        for key, value in _flatten_dict(to_dict(config)).items():
            if value == saved.get(key):
                continue
            if any(key == fixed or key.startswith(fixed + ".") for fixed in _FIXED_ON_RESUME):
                raise ConfigError(
                    f"{key}: this run directory ({run_dir}) has checkpoints made with {saved.get(key)!r}, "
                    f"now {value!r}. Use another train.name, or delete the directory to start over")
            changes.append(f"{key}: {saved.get(key)!r} -> {value!r}")
    if is_primary():
        run_dir.mkdir(parents=True, exist_ok=True)
        saved_path.write_text(to_yaml(config))
    return changes


def _flatten_dict(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Numpy batch -> global device arrays split over the mesh (see `batch_shardings`). Every process
    holds the whole numpy batch and hands each of its own devices that device's shard."""
    shardings = batch_shardings(mesh, batch)
    return {name: jax.make_array_from_callback(x.shape, shardings[name], lambda index, x=x: x[index])
            for name, x in batch.items()}


class _NoWriter:
    """Stands in for MetricsWriter on processes other than 0 (they write no files)."""

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class _StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_bar(config: Config, start: int):
    if not config.train.progress or not is_primary():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=0.5)


# ----------------------------------------------------------------------------------------------
# the whole run

def train(config: Config) -> dict[str, Any]:
    """Train (or resume) the run described by `config`. Returns the final eval metrics and paths.

    Multi-process runs (several hosts, or one process per GPU) start `jax.distributed` from the
    environment first: see `longseq.distributed`.
    """
    initialize_from_environment()
    run_dir = run_directory(config)
    # Everything that can fail on the config fails here, before the run directory is written.
    task = data_lib.make_task(config.data, run_dir=run_dir)  # reloads the run's tokenizer, if it has one
    eval_numpy = data_lib.eval_set(task, config.data)
    choice = sequence_parallel_choice(config)
    mesh = make_mesh(config, choice.grid)
    if config.model.attention_parallel == "auto" and choice.candidates and is_primary():
        print(format_choice(choice, "auto"))
    steps = Steps(config, task, mesh, strategy=choice.strategy)
    # Compiled from shapes before anything is allocated: a step that cannot fit is refused here.
    train_step, memory = steps.compile_train_step(mesh, task.batch("train", 0, config.data.batch_size))
    if is_primary():
        print(memory.line())
    memory.check(config)
    changes = _prepare_run_directory(config, run_dir)
    if is_primary():
        task.save_files(run_dir)

    state = steps.init()

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    start = checkpointer.latest_step() or 0
    if start:
        state = checkpointer.restore(start, state)
        print(f"resumed {run_dir} from step {start}" + "".join(f"\n  changed: {c}" for c in changes))
    else:
        print(f"new run {run_dir}: {steps.num_params:,} parameters, task {task.name} "
              f"(chance accuracy {task.chance_accuracy:.3f}), {mesh.size} device(s) "
              f"(data × fsdp × seq_q × seq_kv = {' × '.join(map(str, mesh.devices.shape))})")

    def put(batch):
        return _put_batch(batch, mesh)

    eval_batches = [put(b) for b in eval_numpy]
    train_batches = data_lib.batches(task, "train", config.data.batch_size, start=start)
    tokens_per_step = config.data.batch_size * config.data.seq_len
    writer = MetricsWriter(run_dir, resume_step=start) if is_primary() else _NoWriter()
    bar = _progress_bar(config, start)
    step, last_good = start, (start or None)
    interval_sums, timer_start, timed_steps, last_grad_norm = None, None, 0, float("nan")

    def record(step_done: int, metrics: dict) -> None:
        """Host-side bookkeeping of a finished step: divergence check, progress bar, metric rows."""
        nonlocal interval_sums, timer_start, timed_steps, last_grad_norm
        metrics = jax.device_get(metrics)
        loss = float(metrics["loss_sum"]) / max(float(metrics["weight_sum"]), 1e-9)
        if not (math.isfinite(loss) and math.isfinite(float(metrics["grad_norm"]))
                and bool(metrics["params_finite"])):
            where = (f"the last good checkpoint is step {last_good} in {run_dir / 'checkpoints'}: rerun with a "
                     "lower optim.lr (or higher optim.warmup_steps) to resume from it" if last_good else
                     "no checkpoint was saved before it: rerun with a lower optim.lr (or higher optim.warmup_steps)")
            raise TrainingDiverged(f"training diverged at step {step_done}: loss={loss}, "
                                   f"grad_norm={float(metrics['grad_norm'])}; {where}")
        sums = {k: metrics[k] for k in ("loss_sum", "correct_sum", "weight_sum")}
        interval_sums = sums if interval_sums is None else {k: interval_sums[k] + sums[k] for k in sums}
        if timer_start is None:  # a process's first step includes compilation: time from its end
            timer_start = time.perf_counter()
        else:
            timed_steps += 1
        last_grad_norm = float(metrics["grad_norm"])
        if step_done % config.train.log_every == 0 or step_done == config.train.steps:
            write_row(step_done)

    def write_row(step_done: int) -> None:
        """One train row: the means over the steps since the last row (none if there are no such steps)."""
        nonlocal interval_sums, timer_start, timed_steps
        if interval_sums is None:
            return
        row = {**means(interval_sums), "grad_norm": last_grad_norm}
        if timed_steps:
            row["tokens_per_sec"] = tokens_per_step * timed_steps / (time.perf_counter() - timer_start)
        writer.write(step_done, "train", row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['accuracy']:.3f}",
                            tok_s=f"{row.get('tokens_per_sec', 0):,.0f}", refresh=False)
        interval_sums, timer_start, timed_steps = None, time.perf_counter(), 0

    def evaluate(step_done: int) -> dict[str, float]:
        result = steps.evaluate(state, eval_batches)
        writer.write(step_done, "eval", {**result, "chance_accuracy": task.chance_accuracy})
        message = f"step {step_done}: eval loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}"
        (bar.write if bar is not None else print)(message)
        return result

    pending = None  # the step just dispatched: its metrics are read after the next one is queued
    final_eval = None
    try:
        with _StopRequest() as stop:
            while step < config.train.steps and not stop.requested:
                state, metrics = train_step(state, put(next(train_batches)))
                step += 1
                if pending is not None:
                    record(*pending)
                pending = (step, metrics)
                if bar is not None:
                    bar.update(1)
                at_end = step == config.train.steps
                if at_end or step % config.train.checkpoint_every == 0 or step % config.train.eval_every == 0:
                    record(*pending)
                    pending = None
                if at_end or step % config.train.eval_every == 0:
                    final_eval = evaluate(step)
                if at_end or step % config.train.checkpoint_every == 0:
                    write_row(step)  # rows end at checkpoints too: a resumed run continues them
                    checkpointer.save(step, state)
                    last_good = step
            if pending is not None:
                record(*pending)
            if stop.requested:
                write_row(step)  # the steps since the last row, so none goes unlogged
                checkpointer.save(step, state)
                raise TrainingInterrupted(f"interrupted at step {step}: checkpoint saved in "
                                          f"{run_dir / 'checkpoints'}; rerun the same command to resume")
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        checkpointer.close()
        if is_primary() and (run_dir / "metrics.jsonl").exists():
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png", title=run_dir.name)

    if final_eval is None:  # resumed a run that had already finished
        final_eval = steps.evaluate(state, eval_batches)
    print(f"done: eval loss {final_eval['loss']:.4f}, accuracy {final_eval['accuracy']:.3f} "
          f"(chance {task.chance_accuracy:.3f})\n  plot:    {run_dir / 'metrics.png'}\n"
          f"  metrics: {run_dir / 'metrics.jsonl'}\n  tensorboard --logdir {run_dir / 'tensorboard'}")
    return {"run_dir": run_dir, "step": step, "chance_accuracy": task.chance_accuracy, **final_eval}


def evaluate_run(run_dir: str | Path) -> dict[str, Any]:
    """Evaluate the newest checkpoint of a run directory on its task's eval set."""
    initialize_from_environment()
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = from_dict(Config, yaml.safe_load(config_path.read_text()))
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=config.train.keep_checkpoints)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"{run_dir}: has no checkpoint to evaluate yet")
    task = data_lib.make_task(config.data, run_dir=run_dir)
    choice = sequence_parallel_choice(config)
    mesh = make_mesh(config, choice.grid)
    steps = Steps(config, task, mesh, strategy=choice.strategy)
    state = checkpointer.restore(step, steps.init())
    checkpointer.close()
    eval_batches = [_put_batch(b, mesh) for b in data_lib.eval_set(task, config.data)]
    return {"run_dir": run_dir, "step": step, "chance_accuracy": task.chance_accuracy,
            **steps.evaluate(state, eval_batches)}

