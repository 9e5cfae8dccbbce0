"""What keep_gathered changes in attention2d's compiled forward+backward step, beside the anchors.

For attention2d on the 2×1 and 1×2 grids with and without keep_gathered, allgather_kv, and (on GPUs) the
all-gather + cuDNN anchor: the all-gathers of the compiled step (count, bytes per device), its
reduce-scatter bytes, XLA's temporary memory, and the median step time. Non-causal, bf16, B=1, H=16, D=128.

    PYTHONPATH=src python3 experiments/sequence_parallel/kept_check.py [SEQ_LEN]    # 2 GPUs; default 65536
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from longseq.bench import comm
from longseq.bench import parallel as bench
from longseq.bench.timing import time_calls


def main(seq_len: int) -> None:
    names = ["sp_attention2d[2x1]", "sp_attention2d+kept[2x1]", "sp_attention2d[1x2]", "sp_attention2d+kept[1x2]",
             "sp_allgather_kv"] + (["anchor_allgather_cudnn"] if jax.default_backend() == "gpu" else [])
    impls = bench.resolve_impls(names, devices=jax.device_count(),
                                block_impl=bench.default_block_impl(jax.default_backend()))
    rng = np.random.default_rng(0)
    for impl in impls:
        mesh = bench.make_mesh(impl.grid)
        sharding = bench.sequence_sharding(mesh)
        q, k, v, dout = (jax.device_put(jnp.asarray(rng.standard_normal((1, seq_len, 16, 128)), jnp.bfloat16),
                                        sharding) for _ in range(4))
        step = jax.jit(comm.forward_and_backward(bench.attention_function(impl, causal=False, mesh=mesh)))
        compiled = step.lower(q, k, v, dout).compile()
        sent = comm.traffic(comm.parse_collectives(compiled.as_text(), jax.device_count()))
        timing = time_calls(step, q, k, v, dout, iters=10, warmup=2)
        print(f"{impl.name:26s} {timing.median_ms:8.2f} ms  all-gathers {sent['ops_by_kind'].get('all-gather', 0)} "
              f"({sent['bytes_by_kind'].get('all-gather', 0) / 1e6:6.1f} MB)  reduce-scatter "
              f"{sent['bytes_by_kind'].get('reduce-scatter', 0) / 1e6:6.1f} MB  temp "
              f"{compiled.memory_analysis().temp_size_in_bytes / 1e9:5.2f} GB", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 65536)
