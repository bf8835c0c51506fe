"""Study 8, sequence parallelism (`experiments/sequence_parallel.py`).

    python -m experiments.sequence_parallel                        # default: T = 512 .. 8192
    python -m experiments.sequence_parallel --config=configs/studies/sequence_parallel.py:quick

Every size runs LASP-2 (linear attention, GLA, delta rule), Ulysses and ring attention over
P = 8 devices. The papers' scale is millions of tokens on 64-128 GPUs (LASP-2: 2048K tokens on 64
GPUs); `default` shrinks it to T = 512 .. 8192 tokens, one sequence, 8 heads of 64 on 8 emulated
CPU devices, where the bytes and the exactness are what they would be on a real mesh and the
times are not. `full` is the same protocol on 8 accelerators (`platform = "default"`) at T = 8K
.. 128K, 16 heads of 128. `quick` only exercises the script: three methods, two short lengths.
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.methods = ("lasp2_linear_attention", "lasp2_gla", "lasp2_delta_rule", "ulysses", "ring")
    config.lengths = (512, 1024, 2048, 4096, 8192)
    config.devices = 8  # the `sequence` axis of the mesh
    config.platform = "cpu"  # "cpu": emulated host devices; "default": the accelerators
    config.batch = 1
    config.heads = 8  # Ulysses splits heads: a multiple of `devices`
    config.head_dim = 64
    config.chunk_size = 64
    config.attention_impl = "auto"  # one device's and Ulysses' per-head-group attention
    config.repeats = 3
    if size == "quick":
        config.methods = ("lasp2_linear_attention", "ulysses", "ring")
        config.lengths = (32, 64)
        config.head_dim = 8
        config.chunk_size = 8
        config.repeats = 1
    elif size == "full":
        config.platform = "default"
        config.lengths = (8192, 16384, 32768, 65536, 131072)
        config.heads = 16
        config.head_dim = 128
        # O(T) memory at float32 on one device (the reference) and in Ulysses' head groups.
        config.attention_impl = "blockwise"
        config.repeats = 10
    return config
