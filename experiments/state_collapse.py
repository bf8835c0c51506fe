"""Study 4: state collapse and length extrapolation. Mamba-2 language models whose state is
large for their training length fail past it, and training-free changes to the recurrence
mitigate that (Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based
Long-Context Modeling", 2024; `../shared/PAPERS.md` B.3 [43]).

    python -m experiments.state_collapse [--config=configs/studies/state_collapse.py:quick]
        [--seeds=0,1,2]

Models: byte-level language models `embed -> num_layers x Mamba-2 -> head`
(`seqjax.nn.mamba2`: per head `H_t = exp(delta_t A) H_{t-1} + B_t (delta_t x_t)^T`,
`y_t = H_t^T C_t + D x_t`), alike but for the state size `N` of `state_sizes` (model `N=8`
etc.; each layer's state is `inner width x N` floats). Three measurements, each a kind of row
(`measure`):

1. Loss by position (`loss`). Each model is trained on the standard library's source
   (`seqjax.data.text.StdlibCorpus`, split "train", documents cut into rows of `train_length`
   bytes, so the model never reads a longer context) with AdamW, warmup over the first tenth
   of the steps and cosine decay. It then reads `eval_rows` held-out documents (split "test":
   the first files, by path, of at least `test_length + 1` bytes; their first `test_length`
   bytes, each predicting the next) from the start, and the mean cross-entropy (nats per byte)
   is reported per position bin: row `length = p` averages positions `(p / 2, p]` (tokens read
   so far), `p = T/4, T/2, T, 2T, ..., test_length` for `T = train_length` (the first bin is
   `(0, T/4]`). The paper plots this to 8-16x the training length: past it, a model with a
   large state collapses (its loss explodes) where a small one does not.
2. State norms by position (`state_norm_mean`, `state_norm_max`, per `layer`). The same pass
   reads the documents `T/4` tokens at a time through the model's decoding cache (exactly the
   parallel pass: the cache carries the state and the convolutions' tails), so the state after
   every `T/4` tokens is at hand; at each `p` above, the Frobenius norm `||H||_F` of every
   head's state `[N, P]`, its mean and its max over heads and documents, per layer. The paper
   probes per-head state statistics this way and finds a few heads' states explode past `T`.
3. Passkey retrieval (`passkey_accuracy`, `passkey_digit_accuracy`, keyed by prompt `length`
   and key `depth`). Separate models of the same shapes are trained on the byte-level passkey
   prompt (`seqjax.data.recall.Passkey`: a 5-digit key sentence at depth `passkey_train_depth`
   in repeated filler, then "What is the pass key? The pass key is " and the key, its digits
   predicted language-model style) at `passkey_train_length` tokens, then tested on held-out
   keys at every `passkey_lengths` x `passkey_depths` (depth 0: the key first, 1: right
   before the question). Accuracy: all digits right under greedy argmax; digit accuracy: the
   fraction of digits right (chance 0.1). The paper's capacity claim: the longest context at
   which the key is still retrieved grows (exponentially) with the state size.

Mitigations (`mitigation`), applied at inference only, through the cache path, to the same
trained parameters (`seqjax.nn.mamba2` options; "none" is the model as trained):

- `decay_clamp` ("forget more and remember less"): every decay `exp(delta_t A_h)` is clamped
  to at most `max_decay = exp(-1 / (clamp_memory * T))`: no head remembers a token with more
  than weight `1/e` after `clamp_memory` training lengths, so the state sums over about as
  many tokens as in training. The paper states the idea (stronger forgetting by a larger step
  or decay); this value is our rule, fixed before any result, not tuned.
- `state_norm` (state normalization): after every update each head's state is scaled down to
  Frobenius norm at most `max_state_norm`, the largest head-state norm the unmitigated model
  reaches within the training length on the same documents (`state_norm_threshold` rows): the
  state is kept within the range training produced. The paper's code (thunlp/stuffed-mamba)
  takes one threshold per head and rescales every 128 tokens; `seqjax.nn.mamba2` takes one
  threshold for all heads and layers, so this is the largest of them, applied every token.

The verdict: does the largest-state model's loss past the training length (mean over the bins
after `T`, minus the bin `(T/2, T]`) rise, and more than the smallest-state model's
(collapse), does each mitigation reduce the largest model's rise, each by more than
`TOLERANCE` nats per byte, and is passkey retrieval past the passkey training length better
with the larger state (capacity).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.study import Study, Summary, check_choices, fail, main, plot_series, train_config
from seqjax.data import IGNORE
from seqjax.data.recall import Passkey
from seqjax.data.text import StdlibCorpus
from seqjax.models import LanguageModel, LanguageModelCache, LanguageModelConfig, build
from seqjax.nn.mamba2 import Mamba2Cache
from seqjax.train.config import validate as validate_training
from seqjax.train.loop import fit, model_config
from seqjax.train.step import token_losses

MITIGATIONS = ("none", "decay_clamp", "state_norm")
NONE = "none"
# The probe interval in training lengths: the state is read every T/4 tokens.
PROBES_PER_TRAIN_LENGTH = 4
PASSKEY_DIGITS = 5
BYTES = 256
# Loss changes smaller than this (nats per byte) count as no change in the verdict.
TOLERANCE = 0.01


def model_name(state_size: int) -> str:
    """The rows' name of the models of state size `N`: `N=<N>`."""
    return f"N={state_size}"


# ----------------------------------------------------------------------------- measurement


def head_state_norms(cache: LanguageModelCache) -> jax.Array:
    """`[L, B, H]`: the Frobenius norm of every head's state `[N, P]` in each of the `L`
    Mamba-2 layers of a model's cache, in layer order (the study's stacks repeat one mixer,
    so a scanned stack's layers are its leading axis)."""
    caches = jax.tree.leaves(cache.layers, is_leaf=lambda node: isinstance(node, Mamba2Cache))
    states = [c.state if c.state.ndim == 5 else c.state[None] for c in caches]
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(states)), axis=(-2, -1)))


def cached_scorer(model: LanguageModel, probe: int) -> Callable:
    """A compiled `(params, tokens [B, S], targets [B, S]) -> (losses [B, S], valid [B, S],
    norms [S / probe, L, B, H])`: the model reads the rows `probe` tokens at a time through its
    decoding cache (so the mitigations apply), `norms[k]` being the head-state norms after
    `(k + 1) probe` tokens."""

    def score(params, tokens, targets):
        batch, length = tokens.shape

        def read(cache, chunk):
            logits, cache = model.apply({"params": params}, chunk[0], cache=cache)
            losses, valid = token_losses(logits.astype(jnp.float32), chunk[1])
            return cache, (losses, valid, head_state_norms(cache))

        def chunks(x):
            return x.reshape(batch, length // probe, probe).swapaxes(0, 1)

        cache = model.init_cache(batch, length)
        _, (losses, valid, norms) = jax.lax.scan(read, cache, (chunks(tokens), chunks(targets)))

        def rows(x):
            return x.swapaxes(0, 1).reshape(batch, length)

        return rows(losses), rows(valid), norms

    return jax.jit(score)


def bin_ends(train_length: int, test_length: int) -> list[int]:
    """`T/4, T/2, T, 2T, ...` below `test_length`, then `test_length`: the ends of the loss
    bins and the positions of the state probes."""
    ends, end = [], train_length // PROBES_PER_TRAIN_LENGTH
    while end < test_length:
        ends.append(end)
        end *= 2
    return [*ends, test_length]


def binned_losses(losses: np.ndarray, valid: np.ndarray, ends: list[int]) -> list[float]:
    """Mean loss over rows and positions `(previous end, end]` (1-based: tokens read) per bin."""
    means, start = [], 0
    for end in ends:
        count = valid[:, start:end].sum()
        means.append(float(losses[:, start:end].sum() / max(count, 1)))
        start = end
    return means


# ----------------------------------------------------------------------------- models


def fit_config(
    config: ml_collections.ConfigDict, state_size: int, seed: int, *, passkey: bool
) -> ml_collections.ConfigDict:
    """The `seqjax.train` config of one model: the text model (rows of `train_length` bytes
    of packed documents) or the passkey model (one prompt per row)."""
    if passkey:
        task, length, steps = "passkey", config.passkey_train_length, config.passkey_steps
        options = {
            **passkey_options(length, config.passkey_train_depth),
            "num_examples": config.passkey_steps * config.batch_size,
        }
    else:
        task, length, steps = "stdlib_text", config.train_length, config.lm_steps
        options = {}
    training = train_config(
        task=task,
        options=options,
        length=length,
        layers=("mamba2",) * config.num_layers,
        mixer_options={"mamba2": {"state_size": state_size, "head_dim": config.head_dim}},
        width=config.width,
        steps=steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        seed=seed,
        mesh=config.mesh.to_dict(),
    )
    if not passkey:
        # The corpus has no generator seed: the seed draws the initialization and data order.
        training.data.options = {"split": "train"}
        training.data.eval_options = {"split": "validation"}
        training.data.packing = "pack"
    training.train.eval_batches = config.eval_batches
    return training


def passkey_options(length: int, depth: float) -> dict:
    """The `Passkey` source's options of a prompt of `length` tokens, the key at `depth`."""
    return {"length": length, "depth": depth, "num_digits": PASSKEY_DIGITS}


def train_model(
    config: ml_collections.ConfigDict, state_size: int, seed: int, *, passkey: bool
) -> tuple[LanguageModelConfig, dict, dict]:
    """`(model config, trained parameters, training summary)` of one model."""
    training = fit_config(config, state_size, seed, passkey=passkey)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        state, summary = fit(training, workdir)
    kind = "passkey" if passkey else "text"
    elapsed = time.perf_counter() - started
    print(f"state_collapse: {kind} model {model_name(state_size)} trained in {elapsed:.0f} s")
    return model_config(training, BYTES), state.params, summary


def with_mitigation(model: LanguageModelConfig, **options) -> LanguageModelConfig:
    """`model` with extra Mamba-2 options (the parameters are unchanged)."""
    mixer = {**model.mixer_options["mamba2"], **options}
    return dataclasses.replace(model, mixer_options={"mamba2": mixer})


def max_decay(config: ml_collections.ConfigDict) -> float:
    """The decay clamp: `exp(-1 / (clamp_memory * train_length))`."""
    return math.exp(-1 / (config.clamp_memory * config.train_length))


# ----------------------------------------------------------------------------- measurements


def held_out_documents(config: ml_collections.ConfigDict) -> np.ndarray:
    """`[eval_rows, test_length + 1]` int32 bytes: the start of each of the first `eval_rows`
    files (by path) of the corpus's "test" split that have at least `test_length + 1` bytes."""
    corpus = StdlibCorpus(split="test")
    needed = config.test_length + 1
    rows = []
    for path in corpus.files:
        file = corpus.directory / path
        if len(rows) < config.eval_rows and file.stat().st_size >= needed:
            with open(file, "rb") as handle:
                rows.append(np.frombuffer(handle.read(needed), np.uint8))
    if len(rows) < config.eval_rows:
        fail(
            "eval_rows",
            f"the test split has {len(rows)} files of at least test_length + 1 = {needed} "
            f"bytes, {config.eval_rows} wanted",
        )
    return np.stack(rows).astype(np.int32)


def text_rows(
    config: ml_collections.ConfigDict, state_size: int, seed: int
) -> tuple[list[dict], str]:
    """Trains the text model of `state_size` and measures loss and state norms by position,
    unmitigated first (which calibrates `state_norm`), then with each mitigation. Returns the
    rows and the training corpus's content hash."""
    model, params, summary = train_model(config, state_size, seed, passkey=False)
    name = model_name(state_size)
    mixer = model.layer_specs()[0][1]
    blank = dict(mitigation="-", layer="-", length="-", depth="-")
    rows = [
        dict(measure="parameters", model=name, **blank, value=summary["parameters"]),
        dict(
            measure="state_floats_per_layer",
            model=name,
            **blank,
            value=mixer.num_heads * mixer.state_size * mixer.head_dim,
        ),
    ]
    documents = held_out_documents(config)
    tokens, targets = jnp.asarray(documents[:, :-1]), jnp.asarray(documents[:, 1:])
    probe = config.train_length // PROBES_PER_TRAIN_LENGTH
    ends = bin_ends(config.train_length, config.test_length)
    threshold = None
    for mitigation in sorted(config.mitigations, key=MITIGATIONS.index):
        options = {
            NONE: {},
            "decay_clamp": {"max_decay": max_decay(config)},
            "state_norm": {"max_state_norm": threshold},
        }[mitigation]
        scorer = cached_scorer(build(with_mitigation(model, **options)), probe)
        losses, valid, norms = jax.device_get(scorer(params, tokens, targets))
        if mitigation == NONE:
            threshold = float(norms[:PROBES_PER_TRAIN_LENGTH].max())
            rows.append(dict(measure="state_norm_threshold", model=name, **blank, value=threshold))
        keys = dict(model=name, mitigation=mitigation, depth="-")
        for end, loss in zip(ends, binned_losses(losses, valid, ends), strict=True):
            rows.append(dict(measure="loss", **keys, layer="-", length=end, value=loss))
        for end in ends:
            for layer, heads in enumerate(norms[end // probe - 1]):
                for measure, value in (
                    ("state_norm_mean", heads.mean()),
                    ("state_norm_max", heads.max()),
                ):
                    rows.append(
                        dict(measure=measure, **keys, layer=layer, length=end, value=float(value))
                    )
    return rows, summary["data"]["content_hash"]


def passkey_rows(config: ml_collections.ConfigDict, state_size: int, seed: int) -> list[dict]:
    """Trains the passkey model of `state_size`; its accuracy at every (length, depth)."""
    lm_config, params, _ = train_model(config, state_size, seed, passkey=True)
    model = build(lm_config)

    @jax.jit
    def predict(params, tokens):
        return jnp.argmax(model.apply({"params": params}, tokens)[0], axis=-1)

    rows = []
    for length in config.passkey_lengths:
        for depth in config.passkey_depths:
            source = Passkey(
                **passkey_options(length, depth),
                seed=10_000 + seed,
                num_examples=config.passkey_examples,
            )
            examples = [source[i] for i in range(len(source))]
            inputs = np.stack([e["inputs"] for e in examples])
            targets = np.stack([e["targets"] for e in examples])
            predicted = np.asarray(predict(params, jnp.asarray(inputs)))
            right = ((predicted == targets) & (targets != IGNORE)).sum(axis=1)
            keys = dict(model=model_name(state_size), mitigation=NONE, layer="-")
            rows += [
                dict(
                    measure="passkey_accuracy",
                    **keys,
                    length=length,
                    depth=depth,
                    value=float(np.mean(right == PASSKEY_DIGITS)),
                ),
                dict(
                    measure="passkey_digit_accuracy",
                    **keys,
                    length=length,
                    depth=depth,
                    value=float(np.mean(right) / PASSKEY_DIGITS),
                ),
            ]
    return rows


# ----------------------------------------------------------------------------- the study


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], str]:
    """Every model's text rows, then every model's passkey rows; the corpus's content hash."""
    rows = []
    for state_size in config.state_sizes:
        text, corpus_hash = text_rows(config, state_size, seed)
        rows += text
    for state_size in config.state_sizes:
        rows += passkey_rows(config, state_size, seed)
    return rows, corpus_hash


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown mitigations, impossible sizes, prompts the passkey source rejects and models
    that cannot be built fail before training."""
    check_choices("mitigations", config.mitigations, MITIGATIONS)
    if NONE not in config.mitigations:
        fail("mitigations", f"must include {NONE!r}: the mitigations are compared with it")
    positive = (
        "width num_layers head_dim lm_steps passkey_steps batch_size eval_batches eval_rows "
        "train_length test_length passkey_train_length passkey_examples"
    ).split()
    for field in positive:
        value = config[field]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            fail(field, f"expected a positive integer, got {value!r}")
    sizes = config.state_sizes
    if len(sizes) < 2 or any(not isinstance(n, int) or n < 1 for n in sizes):
        fail("state_sizes", f"expected two or more positive integers, got {sizes}")
    probe = config.train_length // PROBES_PER_TRAIN_LENGTH
    if config.train_length % PROBES_PER_TRAIN_LENGTH:
        fail(
            "train_length",
            f"expected a multiple of {PROBES_PER_TRAIN_LENGTH} (the state is probed every "
            f"train_length / {PROBES_PER_TRAIN_LENGTH} tokens), got {config.train_length}",
        )
    if config.test_length < config.train_length or config.test_length % probe:
        fail(
            "test_length",
            f"expected at least train_length = {config.train_length} and a multiple of "
            f"train_length / {PROBES_PER_TRAIN_LENGTH} = {probe}, got {config.test_length}",
        )
    for field in ("clamp_memory", "learning_rate"):
        if not config[field] > 0:
            fail(field, f"expected a positive number, got {config[field]!r}")
    if 2 * config.width % config.head_dim:
        fail("head_dim", f"must divide Mamba-2's inner width 2 * width = {2 * config.width}")
    for field in ("passkey_lengths", "passkey_depths"):
        if not config[field]:
            fail(field, "expected at least one entry")
    train_length = config.passkey_train_length
    prompts = [("passkey_train_length", train_length, 0.0)]
    prompts += [("passkey_train_depth", train_length, config.passkey_train_depth)]
    prompts += [("passkey_lengths", length, 0.0) for length in config.passkey_lengths]
    prompts += [("passkey_depths", train_length, depth) for depth in config.passkey_depths]
    for field, length, depth in prompts:
        try:
            Passkey(**passkey_options(length, depth))
        except ValueError as error:
            fail(field, str(error))
    for state_size in sizes:
        for passkey in (False, True):
            training = fit_config(config, state_size, seed=0, passkey=passkey)
            validate_training(training)
            try:
                model_config(training, BYTES)
            except ValueError as error:
                raise ValueError(str(error).replace("config.model.", "config.", 1)) from None
    held_out_documents(config)


def model_names(summary: Summary) -> list[str]:
    """The models of the summary, smallest state first."""
    names = {row["model"] for row in summary.rows if row["model"].startswith("N=")}
    return sorted(names, key=lambda name: int(name.removeprefix("N=")))


def plot(summary: Summary, figure) -> None:
    """Loss by position, the unmitigated state norms by position, and the passkey grids of
    the smallest and the largest state."""
    (loss_ax, norm_ax), passkey_axes = figure.subplots(2, 2)
    names = model_names(summary)
    train_length = summary.config.get("train_length")
    layers = sorted({r["layer"] for r in summary.rows if r["measure"] == "state_norm_mean"})
    for name in names:
        for mitigation in MITIGATIONS:
            rows = [
                r
                for r in summary.rows
                if r["measure"] == "loss" and r["model"] == name and r["mitigation"] == mitigation
            ]
            plot_series(loss_ax, rows, "length", "value", f"{name} {mitigation}")
        for layer in layers:
            rows = [
                r
                for r in summary.rows
                if r["measure"] == "state_norm_mean"
                and r["model"] == name
                and r["mitigation"] == NONE
                and r["layer"] == layer
            ]
            plot_series(norm_ax, rows, "length", "value", f"{name} layer {layer}")
    for ax in (loss_ax, norm_ax):
        if train_length:
            ax.axvline(train_length, color="gray", linestyle=":", linewidth=1)
        ax.set(xscale="log", xlabel="tokens read")
        ax.legend(fontsize="xx-small")
    loss_ax.set(ylabel="loss (nats/byte)", title="loss by position (dotted: T)")
    norm_ax.set(yscale="log", ylabel="mean head-state norm", title="state norm, unmitigated")
    for ax, name in zip(passkey_axes, [names[0], names[-1]] if names else [], strict=False):
        rows = [
            r for r in summary.rows if r["measure"] == "passkey_accuracy" and r["model"] == name
        ]
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for r in rows:
            grid[depths.index(r["depth"]), lengths.index(r["length"])] = r["value"][0]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6, color="white")
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths], fontsize=6)
        ax.set_yticks(range(len(depths)), [str(depth) for depth in depths], fontsize=6)
        ax.set(title=f"passkey accuracy, {name}", xlabel="prompt length", ylabel="depth")


def loss_rise(summary: Summary, model: str, mitigation: str) -> float | None:
    """The mean loss over the bins past the training length minus the loss of the bin that
    ends at it; None if not measured."""
    train_length = summary.config["train_length"]
    losses = {
        r["length"]: r["value"][0]
        for r in summary.rows
        if r["measure"] == "loss" and r["model"] == model and r["mitigation"] == mitigation
    }
    past = [loss for length, loss in losses.items() if length > train_length]
    if train_length not in losses or not past:
        return None
    return float(np.mean(past)) - losses[train_length]


def passkey_mean(summary: Summary, model: str, measure: str, past: bool) -> float:
    """The mean of `measure` over the depths and the lengths past the passkey training length
    (`past`) or all lengths."""
    rows = [r for r in summary.rows if r["measure"] == measure and r["model"] == model]
    if past:
        rows = [r for r in rows if r["length"] > summary.config["passkey_train_length"]]
    return float(np.mean([r["value"][0] for r in rows]))


def norm_growth(summary: Summary, model: str) -> float:
    """The largest unmitigated head-state norm at the test length over that at the training
    length (over layers)."""

    def largest(length):
        return max(
            r["value"][0]
            for r in summary.rows
            if r["measure"] == "state_norm_max"
            and r["model"] == model
            and r["mitigation"] == NONE
            and r["length"] == length
        )

    return largest(summary.config["test_length"]) / largest(summary.config["train_length"])


def verdict(summary: Summary) -> str:
    """Collapse (does the largest state's loss rise past the training length, and more than
    the smallest state's), mitigation (does each reduce the largest state's rise) and capacity
    (is passkey retrieval past its training length better with the larger state)."""
    names = model_names(summary)
    small, large = names[0], names[-1]
    train_length = summary.config["train_length"]
    rise = {name: loss_rise(summary, name, NONE) for name in (small, large)}
    collapses = rise[large] > max(rise[small], 0.0) + TOLERANCE
    parts = [
        f"state collapse {'reproduces' if collapses else 'does NOT reproduce'}: past the "
        f"training length ({train_length} tokens) the loss of {large} changes by "
        f"{rise[large]:+.3f} nats/byte and that of {small} by {rise[small]:+.3f} (mean over the "
        f"bins to {summary.config['test_length']} tokens minus the bin ending at "
        f"{train_length}); the largest head-state norm grows {norm_growth(summary, large):.2f}x "
        f"({large}) and {norm_growth(summary, small):.2f}x ({small}) from {train_length} to "
        f"{summary.config['test_length']} tokens"
    ]
    mitigated = {m: loss_rise(summary, large, m) for m in MITIGATIONS if m != NONE}
    mitigated = {m: value for m, value in mitigated.items() if value is not None}
    if mitigated:
        helped = [m for m, value in mitigated.items() if value < rise[large] - TOLERANCE]
        if len(helped) == len(mitigated):
            overall = "the mitigations reduce it"
        elif helped:
            overall = f"{len(helped)} of {len(mitigated)} mitigations reduce it"
        else:
            overall = "the mitigations do NOT reduce it"
        details = ", ".join(f"{m} {value:+.3f}" for m, value in mitigated.items())
        parts.append(f"{overall} ({large}'s rise: none {rise[large]:+.3f}, {details})")
    passkey_length = summary.config["passkey_train_length"]
    past = any(
        r["measure"] == "passkey_accuracy" and r["length"] > passkey_length for r in summary.rows
    )
    accuracy, digits = (
        {name: passkey_mean(summary, name, measure, past) for name in (small, large)}
        for measure in ("passkey_accuracy", "passkey_digit_accuracy")
    )
    better = (accuracy[large], digits[large]) > (accuracy[small], digits[small])
    where = (
        f"past the passkey training length ({passkey_length} tokens)"
        if past
        else "at the tested lengths"
    )
    parts.append(
        f"passkey capacity {'reproduces' if better else 'does NOT reproduce'}: {where} {large} "
        f"retrieves {accuracy[large]:.3f} of the keys ({digits[large]:.3f} of the digits) and "
        f"{small} {accuracy[small]:.3f} ({digits[small]:.3f})"
    )
    return "; ".join(parts) + "."


STUDY = Study(
    number=4,
    name="state_collapse",
    title="State collapse and length extrapolation",
    claim=(
        "Chen et al. (2024), 'Stuffed Mamba': a Mamba-2 whose recurrent state is large for "
        "its training length never learns to forget, so past that length its state explodes "
        "and its loss collapses ('state collapse'), while a smaller state extrapolates; "
        "training-free changes (stronger forgetting, state normalization) remove the collapse; "
        "and the context length at which a passkey is still retrieved grows with the state size."
    ),
    keys=("measure", "model", "mitigation", "layer", "length", "depth"),
    metrics=("value",),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
