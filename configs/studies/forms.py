"""Study 7, forms of the same layer (`experiments/forms.py`).

python -m experiments.forms                                   # default: T = 256 .. 8192
python -m experiments.forms --config=configs/studies/forms.py:quick
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.ops = ("gla", "delta_rule", "decayed_linear_attention")
    config.forms = ("recurrent", "parallel", "chunked")
    config.lengths = (256, 512, 1024, 2048, 4096, 8192)
    # The parallel form's memory is quadratic in T, and GLA's (per-key decay) holds
    # [B, H, T, T, K]: 8.6 GB a copy at T = 2048 here, past a 24 GiB laptop with gradients.
    config.max_parallel_length = 1024
    config.batch = 2
    config.heads = 4
    config.head_dim = 64
    config.chunk_size = 64
    config.repeats = 5
    if size == "quick":
        config.lengths = (32, 64)
        config.batch, config.heads, config.head_dim = 1, 1, 16
        config.chunk_size = 16
        config.repeats = 1
    elif size == "full":
        config.lengths = (1024, 2048, 4096, 8192, 16384, 32768)
        config.max_parallel_length = 4096
        config.batch, config.heads, config.head_dim = 8, 16, 128
        config.repeats = 10
    return config
