"""The `longseq` command.

    longseq train CONFIG [key.sub=value ...]     train (or resume) a run
    longseq eval RUN_DIR                          evaluate a run's newest checkpoint
    longseq config show CONFIG [key=value ...]   print the resolved config as YAML
    longseq config keys                           list every config key with its default and meaning
    longseq bench attention [options]             time attention against the anchors (cuDNN, XLA, Pallas mha)
    longseq bench parallel [options]              time sequence-parallel attention on all visible devices
    longseq bench comm [options]                  bytes each device sends in sequence-parallel attention (HLO)
    longseq bench long_conv [options]             time the long convolution against the anchors' jnp.fft formula

Config problems are reported before anything compiles, as `config error: <dotted.key>: <what is wrong>`,
with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
from pathlib import Path

from longseq.config import Config, ConfigError, describe_fields, load_config, to_yaml


def resolve(config_path: str, overrides: list[str]) -> Config:
    """The config of a run: the YAML file, its overrides, and the run named after the file by default."""
    config = load_config(config_path, overrides)
    if config.train.name is None:
        config = dataclasses.replace(config, train=dataclasses.replace(config.train, name=Path(config_path).stem))
    return config


# ----------------------------------------------------------------------------------------------
# `longseq bench attention`: argument types (plain parsing; the bench module, which imports jax,
# checks names against what the installed longseq offers)


def _comma_list(text: str) -> tuple[str, ...]:
    """"a,b" -> ("a", "b"); empty items are an error."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return items


def _shape_argument(text: str) -> tuple[int, int, int, int]:
    """"B,N,H,D" -> (batch, seq_len, heads, head_dim)."""
    try:
        shape = tuple(int(item) for item in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected B,N,H,D (four positive integers), got {text!r}")
    return shape


def _flash_argument(text: str) -> tuple[str, dict[str, int]]:
    """"NAME:key=val,key=val" -> (NAME, {key: int(val)}); "NAME:" alone is the default config."""
    name, colon, settings = text.partition(":")
    if not name or not colon:
        raise argparse.ArgumentTypeError(f"expected NAME:key=value,key=value, got {text!r}")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, equals, value = item.partition("=")
        try:
            overrides[key.strip()] = int(value)
        except ValueError:
            equals = ""
        if not equals or not key.strip():
            raise argparse.ArgumentTypeError(f"{name}: expected key=integer, got {item!r} in {text!r}")
    return name, overrides


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


# The bench's argument names (BenchArgumentError.argument) as the flags that set them.
_BENCH_FLAGS = {"shapes": "--shape", "dtype": "--dtype", "impls": "--impls", "flash_variants": "--flash",
                "causal": "--causal", "passes": "--passes", "iters": "--iters", "warmup": "--warmup"}


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks against the anchors (/work/shared/anchors)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    attention = bench_commands.add_parser(
        "attention", help="time attention implementations: fwd and fwd+bwd, causal and not",
        description="Time longseq.ops.attention and the anchors (cuDNN, XLA and Pallas mha called directly "
                    "from JAX) in one process. Writes attention.json, attention.md and attention.png to --out "
                    "and prints the markdown table.")
    attention.add_argument("--shapes", choices=("anchors", "small"), default=None,
                           help="preset shapes: anchors = the anchors table (bf16, head_dim 128; the default "
                                "without --shape), small = a CPU smoke run (float32)")
    attention.add_argument("--shape", action="append", type=_shape_argument, default=[], metavar="B,N,H,D",
                           help="a custom shape (repeatable; added to --shapes if both are given)")
    attention.add_argument("--impls", type=_comma_list, default=None, metavar="A,B",
                           help="implementations: names of longseq.ops.ATTENTION_IMPLS (pallas, reference, ...) and "
                                "anchor_cudnn, anchor_xla, anchor_jax_pallas_mha (default on GPU: pallas and the "
                                "three anchors; elsewhere: reference, anchor_xla)")
    attention.add_argument("--flash", action="append", type=_flash_argument, default=[],
                           metavar="NAME:KEY=VAL,...",
                           help="also measure our Pallas kernel with these FlashAttentionConfig overrides, as "
                                "impl pallas[NAME] (repeatable), e.g. big:block_q=128,block_k=128")
    attention.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    attention.add_argument("--passes", type=_comma_list, default=("fwd", "fwd+bwd"), metavar="fwd,fwd+bwd")
    attention.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                           help="of q, k, v (default: the preset's; bfloat16 for custom shapes)")
    attention.add_argument("--iters", type=_positive_int, default=10, help="timed calls per row (median)")
    attention.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed calls first")
    attention.add_argument("--out", default=None, metavar="DIR",
                           help="output folder (default runs/bench/attention-<timestamp>)")
    _add_bench_parallel_parser(bench_commands)
    _add_bench_comm_parser(bench_commands)
    links = bench_commands.add_parser(
        "links", help="GB/s between devices (inside a node, across nodes): the cost model's link figures",
        description="Time a ppermute ring of --mib MiB per device over this process's devices (inside a node) "
                    "and, with several processes, over one device of each (across nodes); print GB/s per device "
                    "one way and the mesh.*_gbps override that feeds the cost model of attention_parallel=auto.")
    links.add_argument("--mib", type=_positive_int, default=1024,
                       help="MiB each device sends (default 1024: the rate grows with the message up to ~1 GiB)")
    links.add_argument("--iters", type=_positive_int, default=5, help="timed calls per row (median)")
    links.add_argument("--warmup", type=_positive_int, default=2, help="untimed calls first")
    _add_bench_long_conv_parser(bench_commands)
    memory = bench_commands.add_parser(
        "memory", help="peak memory, step time and the longest context that trains, per remat policy and loss chunk",
        description="Sweep the context of a config at batch 1 for each model.mixer × train.remat × train.loss_chunk, "
                    "one fresh process per configuration: the trainer's memory report (refused where it cannot "
                    "fit), then, where it fits, the allocator's peak and the step time. A series stops at its first "
                    "context that does not fit or fails. Writes memory.json / .md / .png.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    memory.add_argument("config", help="YAML config file, e.g. configs/bench_lm_370m.yaml")
    memory.add_argument("overrides", nargs="*", help="dotted overrides for every configuration")
    memory.add_argument("--mixers", type=_comma_list, default=["attention", "long_conv"], help="model.mixer values (A,B)")
    memory.add_argument("--seq", type=_int_list, default=[8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576],
                        help="contexts, tokens per sequence (A,B,...)")
    memory.add_argument("--remat", type=_comma_list, default=["none", "full"], help="train.remat policies (A,B)")
    memory.add_argument("--remat-save", type=_comma_list, default=["block_input"],
                        help="train.remat_save of the save_named and offload policies (A,B; default block_input)")
    memory.add_argument("--loss-chunk", type=_int_list, default=[0, 4096],
                        help="train.loss_chunk values, 0 = the plain loss (A,B)")
    memory.add_argument("--iters", type=_positive_int, default=2, help="timed steps per configuration (median)")
    memory.add_argument("--warmup", type=_non_negative_int, default=1, help="untimed steps first")
    memory.add_argument("--out", default=None, help="output folder (default runs/bench/memory-<timestamp>)")
    train = bench_commands.add_parser(
        "train", help="steady-state step time, tokens/s, memory and MFU of a config's train step",
        description="Build the run CONFIG describes (model, optimizer, mesh) and time its jitted train step on one "
                    "fixed batch; print step ms, tokens/s, model TFLOP/s (6 x matmul params x tokens + causal "
                    "attention, as MaxText counts), MFU of the chip's datasheet bf16 peak, the fraction of a bf16 "
                    "matmul's TFLOP/s measured in the same process, and peak device memory.")
    train.add_argument("config", help="YAML config file, e.g. configs/bench_lm_370m.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=2")
    train.add_argument("--iters", type=_positive_int, default=8, help="timed steps (median)")
    train.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed steps first")
    train.add_argument("--matmul-size", type=_positive_int, default=8192, help="side of the ceiling's bf16 matmul")
    train.add_argument("--out", default=None, metavar="DIR", help="write DIR/train.json")


def _bench_attention(args: argparse.Namespace, argv: list[str]) -> int:
    from longseq.bench.attention import (PRESET_DTYPES, SHAPE_PRESETS, BenchArgumentError, format_table,
                                         run_attention_bench)

    def argument_error(flag: str, message: str) -> int:
        print(f"longseq bench attention: error: argument {flag}: {message}", file=sys.stderr)
        return 2

    preset = args.shapes or (None if args.shape else "anchors")
    shapes = [*(SHAPE_PRESETS[preset] if preset else ()), *args.shape]
    dtype = args.dtype or (PRESET_DTYPES[preset] if preset else "bfloat16")
    flash_variants = {}
    for name, overrides in args.flash:
        if name in flash_variants:
            return argument_error("--flash", f"variant {name!r} given twice")
        flash_variants[name] = overrides
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / f"attention-{stamp}"
    try:
        rows = run_attention_bench(shapes, args.impls, causal=causal, passes=args.passes, dtype=dtype,
                                   iters=args.iters, warmup=args.warmup, flash_variants=flash_variants,
                                   out_dir=out_dir, command=shlex.join(["longseq", *argv]))
    except BenchArgumentError as error:
        return argument_error(_BENCH_FLAGS.get(error.argument, error.argument), error.message)
    print()
    print(format_table(rows), end="")
    print(f"\nwrote {out_dir}/attention.json, attention.md, attention.png")
    return 0


# ----------------------------------------------------------------------------------------------
# `longseq bench parallel`

# The parallel bench's argument names (BenchArgumentError.argument) as the flags that set them.
_BENCH_PARALLEL_FLAGS = {"seq_lens": "--seq", "batch": "--batch", "heads": "--heads", "head_dim": "--head-dim",
                         "dtype": "--dtype", "impls": "--impls", "causal": "--causal", "passes": "--passes",
                         "block_impl": "--block-impl", "order": "--order", "iters": "--iters", "warmup": "--warmup"}


def _add_bench_parallel_parser(bench_commands) -> None:
    parallel = bench_commands.add_parser(
        "parallel", help="time sequence-parallel attention (every strategy) on all visible devices",
        description="Time longseq.parallel.attention (every strategy) on all visible "
                    "devices against one device doing the whole problem and the all-gather K/V + cuDNN anchor, "
                    "in one process. Writes parallel.json, parallel.md and parallel.png to --out and prints the "
                    "markdown table.")
    parallel.add_argument("--shapes", choices=("default", "small"), default="default",
                          help="preset: default = B=1, H=16, D=128, bf16, N in 65536, 131072, 262144; small = a "
                               "CPU smoke run (N=256, H=8, D=32, float32)")
    parallel.add_argument("--seq", nargs="+", type=_positive_int, default=None, metavar="N",
                          help="sequence lengths (replace the preset's; each divisible by the device count)")
    parallel.add_argument("--batch", type=_positive_int, default=None, help="batch (default: the preset's)")
    parallel.add_argument("--heads", type=_positive_int, default=None, help="heads (default: the preset's)")
    parallel.add_argument("--head-dim", type=_positive_int, default=None, help="head_dim (default: the preset's)")
    parallel.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                          help="of q, k, v (default: the preset's)")
    parallel.add_argument("--impls", nargs="+", type=_comma_list, default=None, metavar="IMPL",
                          help="implementations (space- or comma-separated): sp_STRATEGY (its default grids: "
                               "every Pq x Pkv = P for attention2d, usp and double_ring, 1xP for the others), sp_STRATEGY[PqxPkv], "
                               "single_device_IMPL (IMPL of longseq.ops.ATTENTION_IMPLS), anchor_allgather_cudnn. "
                               "Default: every strategy, single_device_<block impl>, and the anchor on GPU")
    parallel.add_argument("--block-impl", default=None, metavar="IMPL",
                          help="longseq.ops implementation of every block (default: cudnn on GPU, reference "
                               "elsewhere)")
    parallel.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parallel.add_argument("--passes", type=_comma_list, default=("fwd+bwd",), metavar="fwd,fwd+bwd",
                          help="default fwd+bwd")
    parallel.add_argument("--order", choices=("model", "natural"), default="model",
                          help="sequence order of the strategies' inputs: 'model' = the order an LM keeps its "
                               "tokens in (zigzag for the strategies that balance in place), 'natural' = every "
                               "call swaps into balance and back (default model)")
    parallel.add_argument("--iters", type=_positive_int, default=5, help="timed calls per row (median)")
    parallel.add_argument("--warmup", type=_non_negative_int, default=2, help="untimed calls first")
    parallel.add_argument("--out", default=None, metavar="DIR",
                          help="output folder (default runs/bench/parallel-<timestamp>)")


def _bench_parallel(args: argparse.Namespace, argv: list[str]) -> int:
    from longseq.bench.parallel import SHAPE_PRESETS, BenchArgumentError, format_table, run_parallel_bench

    preset = SHAPE_PRESETS[args.shapes]
    impls = None if args.impls is None else [name for names in args.impls for name in names]
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / f"parallel-{stamp}"
    try:
        rows = run_parallel_bench(
            args.seq or preset.seq_lens, impls, batch=args.batch or preset.batch, heads=args.heads or preset.heads,
            head_dim=args.head_dim or preset.head_dim, dtype=args.dtype or preset.dtype, causal=causal,
            passes=args.passes, block_impl=args.block_impl, order=args.order, iters=args.iters,
            warmup=args.warmup, out_dir=out_dir, command=shlex.join(["longseq", *argv]))
    except BenchArgumentError as error:
        flag = _BENCH_PARALLEL_FLAGS.get(error.argument, error.argument)
        print(f"longseq bench parallel: error: argument {flag}: {error.message}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows), end="")
    print(f"\nwrote {out_dir}/parallel.json, parallel.md, parallel.png")
    return 0


# ----------------------------------------------------------------------------------------------
# `longseq bench comm`

# The comm bench's argument names (BenchArgumentError.argument) as the flags that set them.
_BENCH_COMM_FLAGS = {"devices": "--devices", "seq_len": "--seq", "heads": "--heads", "kv_heads": "--kv-heads",
                     "head_dim": "--head-dim", "batch": "--batch", "dtype": "--dtype", "passes": "--passes",
                     "strategies": "--strategies"}


def _int_list(text: str) -> tuple[int, ...]:
    """"4,8,16" -> (4, 8, 16)."""
    items = tuple(item.strip() for item in text.split(","))
    if not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return tuple(int(item) for item in items)


def _add_bench_comm_parser(bench_commands) -> None:
    comm = bench_commands.add_parser(
        "comm", help="bytes each device sends in the collectives of every strategy (compiled HLO, no run)",
        description="Compile longseq.parallel.attention (attention2d on every grid, ring, ulysses, allgather_kv) "
                    "for P simulated CPU devices (one subprocess per P), read the collectives from the compiled "
                    "HLO and count the bytes each device sends, beside the analytic model. Writes comm.json, "
                    "comm.md and comm.png to --out and prints the markdown table.")
    comm.add_argument("--devices", type=_int_list, default=(4, 8, 16, 64), metavar="P,P",
                      help="device counts (default 4,8,16,64)")
    comm.add_argument("--seq", type=_positive_int, default=8192, metavar="N",
                      help="sequence length, divisible by every P (default 8192; bytes are linear in N)")
    comm.add_argument("--heads", type=_positive_int, default=8, help="query heads (default 8)")
    comm.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads (default: --heads)")
    comm.add_argument("--head-dim", type=_positive_int, default=64, help="head_dim (default 64)")
    comm.add_argument("--batch", type=_positive_int, default=1, help="batch (default 1)")
    comm.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    comm.add_argument("--passes", type=_comma_list, default=("fwd", "fwd+bwd"), metavar="fwd,fwd+bwd")
    comm.add_argument("--strategies", type=_comma_list, default=None, metavar="A,B",
                      help="a subset of attention2d,ring,ulysses,allgather_kv (default: all; ring is the "
                           "reference of the ratios)")
    comm.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/bench/comm-<timestamp>)")


def _bench_comm(args: argparse.Namespace, argv: list[str]) -> int:
    from longseq.bench.comm import STRATEGIES, BenchArgumentError, format_table, run_comm_bench

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / f"comm-{stamp}"
    try:
        rows = run_comm_bench(args.devices, seq_len=args.seq, heads=args.heads, kv_heads=args.kv_heads,
                              head_dim=args.head_dim, batch=args.batch, dtype=args.dtype, passes=args.passes,
                              strategies=args.strategies or STRATEGIES, out_dir=out_dir,
                              command=shlex.join(["longseq", *argv]))
    except BenchArgumentError as error:
        flag = _BENCH_COMM_FLAGS.get(error.argument, error.argument)
        print(f"longseq bench comm: error: argument {flag}: {error.message}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows), end="")
    print(f"\nwrote {out_dir}/comm.json, comm.md, comm.png")
    return 0


# ----------------------------------------------------------------------------------------------
# `longseq bench long_conv`

# The long-conv bench's argument names (BenchArgumentError.argument) as the flags that set them.
_BENCH_LONG_CONV_FLAGS = {"shapes": "--shape", "dtypes": "--dtype", "impls": "--impls", "causal": "--causal",
                          "passes": "--passes", "iters": "--iters", "warmup": "--warmup"}


def _conv_shape_argument(text: str) -> tuple[int, int, int]:
    """"B,H,N" -> (batch, channels, seq_len)."""
    try:
        shape = tuple(int(item) for item in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"expected B,H,N (three positive integers), got {text!r}")
    return shape


def _add_bench_long_conv_parser(bench_commands) -> None:
    long_conv = bench_commands.add_parser(
        "long_conv", help="time the long convolution against jnp.fft: fwd and fwd+bwd, ms and TB/s",
        description="Time longseq.ops.long_conv (every implementation of LONG_CONV_IMPLS) and the anchors' jnp.fft "
                    "convolution (irfft(rfft(u, 2N) * rfft(k, 2N))[:N], called directly) in one process, with the "
                    "effective bandwidth against the copy bandwidth measured in the same run. Writes "
                    "long_conv.json, long_conv.md and long_conv.png to --out and prints the markdown table.")
    long_conv.add_argument("--shapes", choices=("anchors", "small"), default=None,
                           help="preset shapes: anchors = the anchors table (bf16 N = 1K...1M, and two float32 "
                                "rows; the default without --shape), small = a CPU smoke run (float32)")
    long_conv.add_argument("--shape", action="append", type=_conv_shape_argument, default=[], metavar="B,H,N",
                           help="a custom shape: batch, channels, seq_len (repeatable; added to --shapes if both "
                                "are given; in --dtype, bfloat16 by default)")
    long_conv.add_argument("--impls", type=_comma_list, default=None, metavar="A,B",
                           help="implementations: names of longseq.ops.LONG_CONV_IMPLS but auto (fft, ...), "
                                "anchor_jnp_fft (default: all of those), and gated_IMPL: the gated block "
                                "u * (k conv u + u) through ops.gated_long_conv (gated_monarch: fused)")
    long_conv.add_argument("--dtype", type=_comma_list, default=None, metavar="DTYPE[,DTYPE]",
                           help="of u and y (k is float32): of the --shape shapes (default bfloat16); given with "
                                "a preset, it replaces the preset's per-shape dtypes")
    long_conv.add_argument("--causal", choices=("both", "yes", "no"), default="yes",
                           help="default yes (the anchor is causal only)")
    long_conv.add_argument("--passes", type=_comma_list, default=("fwd", "fwd+bwd"), metavar="fwd,fwd+bwd")
    long_conv.add_argument("--iters", type=_positive_int, default=10, help="timed calls per row (median)")
    long_conv.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed calls first")
    long_conv.add_argument("--out", default=None, metavar="DIR",
                           help="output folder (default runs/bench/long_conv-<timestamp>)")


def _bench_long_conv(args: argparse.Namespace, argv: list[str]) -> int:
    from longseq.bench.long_conv import DTYPES, SHAPE_PRESETS, BenchArgumentError, format_table, run_long_conv_bench

    preset = args.shapes or (None if args.shape else "anchors")
    shapes = list(SHAPE_PRESETS[preset]) if preset else []
    if args.dtype:  # the preset's shapes in every --dtype instead of their own
        shapes = list(dict.fromkeys(tuple(shape[:3]) for shape in shapes))
    shapes += args.shape
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else Path("runs") / "bench" / f"long_conv-{stamp}"
    try:
        rows = run_long_conv_bench(shapes, args.impls, dtypes=args.dtype or DTYPES, causal=causal,
                                   passes=args.passes, iters=args.iters, warmup=args.warmup, out_dir=out_dir,
                                   command=shlex.join(["longseq", *argv]))
    except BenchArgumentError as error:
        flag = _BENCH_LONG_CONV_FLAGS.get(error.argument, error.argument)
        print(f"longseq bench long_conv: error: argument {flag}: {error.message}", file=sys.stderr)
        return 2
    print()
    print(format_table(rows), end="")
    print(f"\nwrote {out_dir}/long_conv.json, long_conv.md, long_conv.png")
    return 0


# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train (or resume) a run from a YAML config")
    train.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=500 model.mixer=attention")

    evaluate = commands.add_parser("eval", help="evaluate the newest checkpoint of a run directory")
    evaluate.add_argument("run_dir", help="a run directory, e.g. runs/demo")

    plan = commands.add_parser(
        "plan", help="what a config will run, before running it: the sequence-parallel cost model's table and "
                     "the step's memory per device",
        description="Predict, for the config's attention layer on its mesh.seq_q × mesh.seq_kv sequence devices, "
                    "the forward+backward time of every strategy on every grid (longseq.parallel.cost), fastest "
                    "first, and say which one the run uses (model.attention_parallel, or with auto the fastest "
                    "that fits). Then compile the train step from shapes on this machine's devices and print its "
                    "memory per device (params, optimizer, activations, total against the device), as `longseq "
                    "train` does before it starts, and whether train would refuse it. Runs nothing.")
    plan.add_argument("config", help="YAML config file")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. mesh.seq_q=2 mesh.seq_kv=4")
    plan.add_argument("--system", choices=("h100", "h200", "cpu"), default=None,
                      help="plan for this machine's figures (default: the devices this process sees)")

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config as YAML")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    config_commands.add_parser("keys", help="list every config key with its default and meaning")
    _add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "config" and args.config_command == "show":
            print(to_yaml(resolve(args.config, args.overrides)), end="")
        elif args.command == "config" and args.config_command == "keys":
            for key, default, help in describe_fields():
                print(f"{key:40s} {default:24s} {help}")
        elif args.command == "train":
            from longseq.train import TrainingDiverged, TrainingInterrupted, train

            try:
                train(resolve(args.config, args.overrides))
            except TrainingInterrupted as stop:
                print(stop, file=sys.stderr)
                return 130
            except TrainingDiverged as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
        elif args.command == "plan":
            from longseq.plan import format_choice, memory_plan, sequence_parallel_choice

            config = resolve(args.config, args.overrides)
            system = {} if args.system is None else dict(device_kind=args.system,
                                                         platform="cpu" if args.system == "cpu" else "gpu")
            choice = sequence_parallel_choice(config, **system)
            print(format_choice(choice, config.model.attention_parallel))
            print(memory_plan(config, choice if args.system is None else sequence_parallel_choice(config)))
        elif args.command == "eval":
            from longseq.train import evaluate_run

            result = evaluate_run(args.run_dir)
            print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items()}))
        elif args.command == "bench" and args.bench_command == "attention":
            return _bench_attention(args, argv)
        elif args.command == "bench" and args.bench_command == "parallel":
            return _bench_parallel(args, argv)
        elif args.command == "bench" and args.bench_command == "comm":
            return _bench_comm(args, argv)
        elif args.command == "bench" and args.bench_command == "links":
            from longseq.bench.links import format_rows, run_links_bench
            from longseq.distributed import initialize_from_environment

            initialize_from_environment()
            print(format_rows(run_links_bench(args.mib, args.iters, args.warmup)))
        elif args.command == "bench" and args.bench_command == "long_conv":
            return _bench_long_conv(args, argv)
        elif args.command == "bench" and args.bench_command == "memory":
            from longseq.bench.memory import HEADER, markdown, plot, run_memory_sweep, series_overrides
            from longseq.bench.outputs import save_outputs

            for mixer in args.mixers:  # a bad config fails here, not in every child
                for remat in args.remat:
                    for chunk in args.loss_chunk:
                        load_config(args.config, [*args.overrides, *series_overrides(
                            mixer, remat, chunk or None, min(args.seq), args.remat_save)])
            out = args.out or f"runs/bench/memory-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
            print(HEADER)
            rows = run_memory_sweep(args.config, args.overrides, mixers=args.mixers, seqs=args.seq,
                                    remats=args.remat, loss_chunks=[c or None for c in args.loss_chunk],
                                    remat_save=args.remat_save, iters=args.iters, warmup=args.warmup, out_dir=out)
            paths = save_outputs("memory", rows, {"config": args.config, "overrides": args.overrides}, markdown(rows),
                                 plot, out)
            print(markdown(rows).split("\n\n", 1)[1])
            print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
        elif args.command == "bench" and args.bench_command == "train":
            from longseq.bench.train import format_row, run_train_bench, write_row

            row = run_train_bench(load_config(args.config, args.overrides), iters=args.iters, warmup=args.warmup,
                                  matmul_size=args.matmul_size)
            print(format_row(row))
            if args.out:
                print(f"wrote {write_row(row, args.out)}")
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
