"""Study 5, attention as an RNN (`experiments/aaren.py`).

    python -m experiments.aaren                                   # default: ~15 min per seed
    python -m experiments.aaren --config=configs/studies/aaren.py:quick

"full" is the paper's forecasting setup as I recall it (unverified: the Time Series Library's
Transformer, lookback 96, a 512-wide model of 8 heads, batch 32, horizon 96 of their 96 to
720) on the synthetic series of `seqjax.data.forecasting`, with 7 channels (ETT's), trained
for 20,000 steps. It runs on one GPU without a mesh: the sequences are 96 tokens long.
"default" shrinks it for a 2-core CPU: a 64-wide model of 4 heads, 1 channel, 2,000 steps on
4,096 training series (~16 epochs).
"""

import ml_collections


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.models = ("aaren", "attention")
    # The series (`seqjax.data.forecasting.NoisySinusoids`; the seed is the run's).
    config.data = ml_collections.ConfigDict()
    config.data.context = 96
    config.data.horizon = 96
    config.data.channels = 1
    config.data.num_components = 3
    config.data.min_period = 4.0
    config.data.max_period = 48.0
    config.data.noise_std = 0.3
    config.data.noise_ar = 0.9
    config.position_features = 16
    # Both models: `layers` blocks of the mixer and a SwiGLU MLP.
    config.width = 64
    config.heads = 4
    config.layers = 2
    config.batch_size = 32
    config.train_steps = 2000
    config.learning_rate = 1e-3
    config.weight_decay = 0.01
    config.num_train = 4096
    config.num_test = 1024
    # Exactness on random inputs, and the decode cache's size by context.
    config.exactness_lengths = (96, 1024)
    config.exactness_batch = 2
    config.cache_lengths = (128, 1024, 8192, 65536)
    if size == "quick":
        config.data.context, config.data.horizon = 24, 8
        config.position_features = 4
        config.width, config.heads, config.layers = 16, 2, 1
        config.batch_size, config.train_steps = 8, 20
        config.num_train, config.num_test = 64, 32
        config.exactness_lengths = (24,)
        config.cache_lengths = (64, 1024)
    elif size == "full":
        config.data.channels = 7
        config.width, config.heads = 512, 8
        config.train_steps = 20_000
        config.learning_rate = 1e-4
        config.num_train, config.num_test = 65_536, 8192
        config.exactness_lengths = (96, 1024, 16384)
        config.cache_lengths = (128, 1024, 8192, 65536, 524288)
    return config
