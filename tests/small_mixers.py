"""Small options for every mixer of the registry (few heads, small states and chunks), what
the model-level tests build their models from."""

VOCAB, WIDTH = 37, 32
SMALL = {
    "attention": {"num_heads": 4, "num_kv_heads": 2},
    "gla": {"num_heads": 2, "chunk_size": 8},
    "delta_net": {"num_heads": 2, "chunk_size": 8},
    "gated_delta_net": {"num_heads": 2, "head_dim": 8, "chunk_size": 8},
    "mamba": {"state_size": 8, "chunk_size": 8},
    "mamba2": {"state_size": 16, "head_dim": 16, "chunk_size": 8},
    "hedgehog": {"num_heads": 4, "feature_dim": 8},
    "based": {"num_heads": 2, "feature_dim": 4, "window": 8, "chunk_size": 8},
    "lolcats": {"num_heads": 4, "feature_dim": 8, "window": 8, "chunk_size": 8},
    "liger": {"num_heads": 4, "window": 8, "chunk_size": 8},
    "jrt_rnn": {"num_heads": 2, "feature_dim": 4, "prefix_length": 8, "chunk_size": 8},
    "aaren": {"num_heads": 4},
    "retnet": {"num_heads": 2, "chunk_size": 8},
    "transnormer": {"num_heads": 4, "chunk_size": 8},
    "lightnet": {"expand_ratio": 8, "gate_low_rank": 8, "chunk_size": 8},
    "hgrn": {},
    "hgrn2": {"expand_ratio": 8, "chunk_size": 8},
    "s4": {"state_size": 16},
    "s4d": {"state_size": 16},
    "s5": {"state_size": 32},
    "lru": {"state_size": 32},
    "rg_lru": {"num_heads": 2},
    "diagonal_lrnn": {"allow_neg_eigval": True},
    "mlstm": {"num_heads": 2, "chunk_size": 8},
    "slstm": {"num_heads": 2},
    "lstm": {"num_heads": 2},
    "gru": {"num_heads": 2},
    "mom": {"num_heads": 2, "head_dim": 16, "chunk_size": 8},
}
