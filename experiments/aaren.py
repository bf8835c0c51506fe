"""Study 5: attention as an RNN. Aaren forecasts as well as causal softmax attention, computes
exactly what softmax attention computes, and decodes with a cache that does not grow.

    python -m experiments.aaren [--config=configs/studies/aaren.py:quick] [--seeds=0,1,2]

Feng et al., "Attention as an RNN" (2024; `../shared/PAPERS.md` B.1.8) replace the attention of
a Transformer by Aaren, softmax attention of a learned per-head query `q_h` over each prefix,

    o_t = sum_{i <= t} exp(q_h . k_i / sqrt(K)) v_i / sum_{i <= t} exp(q_h . k_i / sqrt(K)),

computed in parallel by a prefix scan of `(max, denominator, numerator)` under the
online-softmax combine (`seqjax.ops.aaren`) and decoded with that partial as an O(1) state. They
report it comparable to Transformers on 38 datasets, time-series forecasting among them. Three
measurements, each a kind of row (`measure`):

1. Forecasting (`forecast_mse`, `forecast_mae`, keyed by model, lookback `length` and
   `horizon`). Lookback-`T`-to-horizon-`H` forecasting of the synthetic noisy sums of
   sinusoids of `seqjax.data.forecasting` (the paper uses real datasets through the Time
   Series Library; I recall, unverified, its Transformer setup: lookback 96, horizons 96 to
   720, MSE and MAE). Each model is the classifier backbone over real-valued features, every
   layer an `aaren` or an `attention` (RoPE) block with the SwiGLU MLP, the last token's
   features mapped linearly to the `H x C` forecast (`SequenceClassifier` with
   `pooling="last"` used as a regressor). The input at step `t` is the series' `C` values
   and `position_features` sinusoidal features of `t` (the Transformer positional encoding the
   Time Series Library adds to every model's input; Aaren has no other notion of position).
   `seqjax.train.fit` trains language models on tokens only, so the study trains with its own
   loop: mean squared error, AdamW with warmup and cosine decay (`seqjax.train.optimizer`),
   batches drawn without replacement from `num_train` training series, epoch after epoch;
   then MSE and MAE (over horizon steps and channels) on `num_test` held-out series of
   another generator seed. `last_value` rows are the persistence forecast `x_{T-1}`, for scale.
2. Exactness (`scan_vs_recurrent_error_eps`, `scan_vs_attention_error_eps`, model `aaren`,
   at `length` T in `exactness_lengths`), in units of float32's epsilon (2^-23): an Aaren
   layer's parallel (prefix-scan) output against the same layer decoding token by token from
   its cache; and the op's output against causal softmax attention (`seqjax.ops`) with the
   query broadcast to every position, which at the last position is attention's many-to-one
   output. Relative error: max |a - e| / max |e| over random inputs from the seed.
3. Decode memory (`decode_cache_kib`, per model and context `length` in `cache_lengths`): the
   bytes of the model's whole decode cache for one sequence of that capacity (`init_cache` of
   every layer, all leaves), KiB. Read from shapes (`jax.eval_shape`), nothing is allocated.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments.study import Study, Summary, check_choices, fail, main
from seqjax.data.forecasting import NoisySinusoids
from seqjax.models import SequenceClassifier, SequenceClassifierConfig
from seqjax.models.backbone import Backbone
from seqjax.nn.aaren import Aaren, AarenConfig
from seqjax.ops.aaren import aaren
from seqjax.ops.attention import softmax_attention
from seqjax.train.optimizer import optimizer

MODELS = ("aaren", "attention")
BASELINE = "last_value"
EPS = float(np.finfo(np.float32).eps)
# Aaren's forecast MSE within this factor of attention's counts as comparable.
COMPARABLE_RATIO = 1.25
# Forms that agree to this relative error compute one function in float32.
EXACT_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- forecasting


def model_config(config: ml_collections.ConfigDict, mixer: str) -> SequenceClassifierConfig:
    """`config.layers` blocks of `mixer` over real-valued inputs, the forecast as `H * C`
    outputs of the last token."""
    return SequenceClassifierConfig(
        vocab_size=None,
        width=config.width,
        layers=(mixer,) * config.layers,
        mixer_options={mixer: {"num_heads": config.heads}},
        num_classes=config.data.horizon * config.data.channels,
        pooling="last",
    )


def position_features(length: int, count: int) -> np.ndarray:
    """The Transformer's sinusoidal encoding `[T, count]`: `sin(t w_i), cos(t w_i)` with
    `w_i = 10000^(-2i / count)`."""
    rates = 10000.0 ** (-np.arange(0, count, 2) / count)
    angles = np.arange(length)[:, None] * rates
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32)


def with_positions(series: np.ndarray, count: int) -> np.ndarray:
    """`[B, T, C]` values -> `[B, T, C + count]` model inputs."""
    batch, length, _ = series.shape
    positions = np.broadcast_to(position_features(length, count), (batch, length, count))
    return np.concatenate([series, positions], axis=-1)


def forecast_errors(predictions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """MSE and MAE over examples, horizon steps and channels (the Time Series Library's)."""
    difference = predictions.astype(np.float64) - targets
    return {
        "forecast_mse": float(np.mean(difference**2)),
        "forecast_mae": float(np.mean(np.abs(difference))),
    }


def train_and_test(config, mixer: str, seed: int, train: dict, test: dict) -> dict[str, float]:
    """Trains the `mixer` model on `train` (`inputs [N, T, F]`, `targets [N, H, C]`) and
    returns its errors on `test`."""
    model = SequenceClassifier(model_config(config, mixer))
    # The parameters do not depend on the length: one token initializes them (and compiles
    # fast, where a whole sequence would compile the associative scan once more).
    params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(train["inputs"][:1, :1]))
    tx = optimizer(
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.train_steps // 10,
        total_steps=config.train_steps,
    )
    opt_state = tx.init(params)
    horizon_shape = train["targets"].shape[1:]

    def predict(params, inputs):
        return model.apply(params, inputs).reshape(inputs.shape[0], *horizon_shape)

    def loss(params, inputs, targets):
        return jnp.mean((predict(params, inputs) - targets) ** 2)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        value, grads = jax.value_and_grad(loss)(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    for batch in batch_indices(len(train["inputs"]), config.batch_size, config.train_steps, seed):
        params, opt_state, _ = step(
            params, opt_state, train["inputs"][batch], train["targets"][batch]
        )
    predict_batch = jax.jit(predict)
    predictions = np.concatenate(
        [
            np.asarray(predict_batch(params, test["inputs"][start : start + config.batch_size]))
            for start in range(0, len(test["inputs"]), config.batch_size)
        ]
    )
    return forecast_errors(predictions, test["targets"])


def batch_indices(count: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` indices into `count` examples: shuffled epochs, each
    example once per epoch (an epoch's remainder is dropped)."""
    rng = np.random.default_rng(seed)
    per_epoch = count // batch_size
    order = np.empty(0, int)
    for step in range(steps):
        if step % per_epoch == 0:
            order = rng.permutation(count)
        yield order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]


def dataset(config, seed: int, count: int) -> dict[str, np.ndarray]:
    source = NoisySinusoids(**config.data.to_dict(), seed=seed, num_examples=count)
    examples = source.batch(np.arange(count))
    examples["series"] = examples["inputs"]
    examples["inputs"] = with_positions(examples["inputs"], config.position_features)
    return examples


def forecasting_rows(config, seed: int) -> list[dict]:
    train = dataset(config, seed, config.num_train)
    test = dataset(config, 10_000 + seed, config.num_test)
    keys = dict(length=config.data.context, horizon=config.data.horizon)
    persistence = np.repeat(test["series"][:, -1:], config.data.horizon, axis=1)
    errors = {BASELINE: forecast_errors(persistence, test["targets"])}
    for mixer in config.models:
        started = time.perf_counter()
        errors[mixer] = train_and_test(config, mixer, seed, train, test)
        print(f"aaren study: {mixer} trained in {time.perf_counter() - started:.0f} s")
    return [
        dict(measure=measure, model=model, **keys, value=value)
        for model, values in errors.items()
        for measure, value in values.items()
    ]


# ----------------------------------------------------------------------------- exactness


def relative_error(actual: jax.Array, expected: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected))


def scan_vs_recurrent(key: jax.Array, batch: int, length: int, width: int, heads: int):
    """An Aaren layer's parallel output against its token-by-token decoding from its cache."""
    layer = Aaren(AarenConfig(width=width, num_heads=heads))
    x = jax.random.normal(key, (batch, length, width))
    params = layer.init(jax.random.fold_in(key, 1), x[:, :1])  # any length: one token
    parallel, _ = layer.apply(params, x)

    def decode(cache, x_t):
        y_t, cache = layer.apply(params, x_t[:, None], cache=cache)
        return cache, y_t[:, 0]

    _, recurrent = jax.lax.scan(decode, layer.init_cache(batch, length), x.swapaxes(0, 1))
    return relative_error(parallel, recurrent.swapaxes(0, 1))


def scan_vs_attention(key: jax.Array, batch: int, length: int, width: int, heads: int):
    """The Aaren op against causal softmax attention whose every position asks its query."""
    keys = jax.random.split(key, 3)
    q = jax.random.normal(keys[0], (batch, heads, width // heads))
    k = jax.random.normal(keys[1], (batch, length, heads, width // heads))
    v = jax.random.normal(keys[2], (batch, length, heads, width // heads))
    o, _ = aaren(q, k, v)
    expected, _ = softmax_attention(jnp.broadcast_to(q[:, None], k.shape), k, v, causal=True)
    return relative_error(o, expected)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def exactness_errors(key: jax.Array, batch: int, length: int, width: int, heads: int):
    """Both errors, in one compiled call (op by op, the associative scan alone takes
    seconds)."""
    shape = (batch, length, width, heads)
    return {
        "scan_vs_recurrent_error_eps": scan_vs_recurrent(key, *shape),
        "scan_vs_attention_error_eps": scan_vs_attention(jax.random.fold_in(key, 2), *shape),
    }


def exactness_rows(config, seed: int) -> list[dict]:
    rows = []
    for length in config.exactness_lengths:
        key = jax.random.fold_in(jax.random.key(seed), length)
        shape = (config.exactness_batch, length, config.width, config.heads)
        for measure, error in exactness_errors(key, *shape).items():
            rows.append(
                dict(
                    measure=measure,
                    model="aaren",
                    length=length,
                    horizon="-",
                    value=float(error) / EPS,
                )
            )
    return rows


# ----------------------------------------------------------------------------- decode memory


def cache_bytes(config, mixer: str, length: int) -> int:
    """Bytes of the whole model's decode cache for one sequence of capacity `length`."""
    backbone = Backbone(model_config(config, mixer), parent=None)
    shapes = jax.eval_shape(lambda: backbone.init_cache(1, length))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def memory_rows(config) -> list[dict]:
    return [
        dict(
            measure="decode_cache_kib",
            model=mixer,
            length=length,
            horizon="-",
            value=cache_bytes(config, mixer, length) / 1024,
        )
        for mixer in config.models
        for length in config.cache_lengths
    ]


# ----------------------------------------------------------------------------- the study


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], None]:
    rows = memory_rows(config) + exactness_rows(config, seed)
    return rows + forecasting_rows(config, seed), None


def validate(config: ml_collections.ConfigDict) -> None:
    check_choices("models", config.models, MODELS)
    for model in MODELS:
        if model not in config.models:
            fail("models", f"must include {model!r}: the study compares aaren with attention")
    positive = (
        "width heads layers batch_size train_steps num_train num_test exactness_batch".split()
    )
    for field in positive:
        if config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]}")
    if config.width % config.heads:
        fail("heads", f"must divide config.width ({config.width}), got {config.heads}")
    if config.position_features < 0 or config.position_features % 2:
        fail("position_features", f"expected an even count >= 0, got {config.position_features}")
    if config.num_train < config.batch_size:
        fail(
            "num_train",
            f"expected at least one batch ({config.batch_size}), got {config.num_train}",
        )
    if config.learning_rate <= 0:
        fail("learning_rate", f"expected a positive rate, got {config.learning_rate}")
    for field in ("exactness_lengths", "cache_lengths"):
        if not config[field] or min(config[field]) < 1:
            fail(field, f"expected positive lengths, got {config[field]}")
    try:
        NoisySinusoids(**config.data.to_dict())
    except (TypeError, ValueError) as error:
        fail("data", str(error))


def plot(summary: Summary, figure) -> None:
    forecast, memory = figure.subplots(1, 2)
    rows = [r for r in summary.rows if r["measure"] == "forecast_mse"]
    names = [r["model"] for r in rows]
    forecast.bar(
        names, [r["value"][0] for r in rows], yerr=[r["value"][1] for r in rows], capsize=3
    )
    horizon = rows[0]["horizon"] if rows else "?"
    forecast.set(title=f"forecast, horizon {horizon}", ylabel="test MSE")
    for model in MODELS:
        points = sorted(
            (r["length"], r["value"][0])
            for r in summary.rows
            if r["measure"] == "decode_cache_kib" and r["model"] == model
        )
        if points:
            memory.plot(*zip(*points, strict=True), marker="o", label=model)
    memory.set(
        xscale="log", yscale="log", title="decode cache", xlabel="context (tokens)", ylabel="KiB"
    )
    memory.legend()


def verdict(summary: Summary) -> str:
    """Forecast MSE ratio, the worst exactness error, and how each cache grows."""
    mse = {r["model"]: r["value"] for r in summary.rows if r["measure"] == "forecast_mse"}
    aaren_mse, attention_mse = mse["aaren"][0], mse["attention"][0]
    ratio = aaren_mse / attention_mse
    if ratio <= COMPARABLE_RATIO:
        finding = "lower than" if ratio < 1 else f"within {COMPARABLE_RATIO - 1:.0%} of"
        forecast = f"Aaren's forecast MSE is {finding} attention's, so the claim reproduces"
    else:
        forecast = (
            f"Aaren's forecast MSE is more than {COMPARABLE_RATIO - 1:.0%} above attention's, "
            "so the claim does NOT reproduce here"
        )
    forecast += (
        f" (Aaren {aaren_mse:.3f} ± {mse['aaren'][1]:.3f}, attention {attention_mse:.3f} ± "
        f"{mse['attention'][1]:.3f}, ratio {ratio:.2f}; persistence {mse[BASELINE][0]:.3f})"
    )
    errors = [r["value"][0] for r in summary.rows if r["measure"].endswith("_error_eps")]
    worst = max(errors) * EPS
    exact = "agree" if worst < EXACT_TOLERANCE else "DO NOT agree"
    parts = [
        forecast,
        f"the prefix scan, token-by-token decoding and causal softmax attention {exact} "
        f"(worst relative error {worst:.1e})",
    ]
    for model in MODELS:
        sizes = sorted(
            (r["length"], r["value"][0])
            for r in summary.rows
            if r["measure"] == "decode_cache_kib" and r["model"] == model
        )
        (short, small), (long, large) = sizes[0], sizes[-1]
        growth = "constant" if math.isclose(small, large) else f"{large / small:.0f}x larger"
        parts.append(
            f"{model}'s decode cache for a {long // short}x longer context is {growth} "
            f"({small:.1f} to {large:.1f} KiB)"
        )
    return "; ".join(parts) + "."


STUDY = Study(
    number=5,
    name="aaren",
    title="Attention as an RNN",
    claim=(
        "Feng et al. (Aaren, 2024): Aaren, softmax attention of a learned query computed as a "
        "prefix scan, performs comparably to Transformers (on time-series forecasting among 38 "
        "datasets) while decoding with constant memory, where attention's KV cache grows "
        "linearly with the context."
    ),
    keys=("measure", "model", "length", "horizon"),
    metrics=("value",),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
