"""Study 2, recall versus state size (`experiments/recall.py`).

    python -m experiments.recall                                  # default: the CPU protocol
    python -m experiments.recall --config=configs/studies/recall.py:quick

`full` is Zoology's MQAR grid as the DeltaNet, GLA and MoM papers run it (PAPERS.md B.3): two
layers, vocabulary 8192, widths 32 to 128 here (Zoology: 64 to 512), T = 256 with 4 to 64
key-value pairs, a learning-rate sweep whose best test accuracy is kept, one model per grid
cell (Zoology trains one model on a mixture of (T, P) settings and tests each). `default`
shrinks it for a 2-core CPU: vocabulary 256 (the output layer dominates small models'
cost), T = 64 with 8 pairs only, widths 32 and 64, one learning rate, 2000 steps of batch 32
(Zoology: tens of epochs of 100k examples), and no MoM, whose five memories cost ten times
attention's step on a CPU (about 0.5 s at width 64: an hour per seed alone). A second
key-value count would double the time. `quick` only exercises the script.

Every family has a short convolution on q, k and v (Mamba-2's is built in, DeltaNet's and
Gated DeltaNet's are on by default; attention, Based and GLA take `use_short_conv`; attention's
is Primer's, of width 3 and without activation, as the issue's "attention with short
convolution" asks). Without one a linear attention cannot tie a value to the key before it,
and MQAR is out of its reach: with 400 steps and no convolution on Based, every family but
DeltaNet stayed at the 1/8 of guessing among the context's values (the first committed
default). Attention without one learns the induction step late (RoPE gives it the offset):
in probes at width 64 it rose from 0.13 to 0.72 between steps 670 and 1330, and at width 32
it was still at 0.13 after 2000; hence the convolution and 2000 steps.
"""

import ml_collections

MIXERS = ("attention", "based", "gla", "mamba2", "delta_net", "gated_delta_net", "mom")


def get_config(size: str = "default") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.size = size
    config.mixers = tuple(m for m in MIXERS if m != "mom")
    # Options beyond the width-scaled head shapes of `experiments.recall.mixer_options`: a
    # short convolution on every family that has it as an option, and a Mamba-2 state of
    # N = 16 per channel (its default 128 outgrows every other family).
    config.mixer_options = ml_collections.ConfigDict(
        {
            "attention": {"use_short_conv": True},
            "based": {"use_short_conv": True},
            "gla": {"use_short_conv": True},
            "mamba2": {"state_size": 16},
        }
    )
    config.widths = (32, 64)
    config.num_kv_pairs = (8,)
    config.length = 64
    config.vocab_size = 256
    config.num_layers = 2
    config.num_heads = 2
    config.learning_rates = (3e-3,)
    config.train_steps = 2000
    config.batch_size = 32
    config.train_examples = 100_000
    config.eval_batches = 16
    if size == "quick":
        config.mixers = ("based", "delta_net")
        config.widths = (16,)
        config.num_layers = 1
        config.num_kv_pairs = (4,)
        config.length = 32
        config.vocab_size = 64
        config.train_steps = 4
        config.batch_size = 8
        config.eval_batches = 1
    elif size == "full":
        config.mixers = MIXERS
        config.widths = (32, 64, 128)
        config.num_kv_pairs = (4, 8, 16, 32, 64)
        config.length = 256
        config.vocab_size = 8192
        config.learning_rates = (3e-4, 1e-3, 3e-3, 1e-2)
        config.train_steps = 10_000
        config.batch_size = 256
        config.train_examples = config.train_steps * config.batch_size
        config.eval_batches = 12  # 3072 test examples, Zoology's 3000
        config.mesh = ml_collections.ConfigDict({"data": -1})
    return config
