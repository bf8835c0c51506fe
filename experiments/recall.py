"""Study 2: recall versus state size. Multi-query associative recall (MQAR) accuracy of
two-layer models of each mixer family, plotted against the recurrent state each layer carries.

    python -m experiments.recall [--config=configs/studies/recall.py:quick] [--seeds=0,1,2]

Protocol (Zoology: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in
Efficient Language Models", 2023, `zoology/data/multiquery_ar.py`; as the DeltaNet, GLA and MoM
papers use it, PAPERS.md B.1.3, B.1.5, B.3). An MQAR example (`seqjax.data.recall.MQAR`) of
`T = length` tokens over a vocabulary of `V` writes `P = num_kv_pairs` key-value pairs
`k_1 v_1 .. k_P v_P`, then queries every key once at power-law-distributed positions of the
rest; the label on each query token is its value. For each mixer, model width `d` and `P`, a
model `embed -> 2 x [mixer, (MLP)] -> head` is trained from scratch on freshly drawn examples
and tested on held-out ones; the metric is the fraction of query tokens whose value is
predicted exactly. With several `learning_rates`, each is trained and the best test accuracy
is kept, as Zoology reports the best of its learning-rate sweep.

The x-axis is the decode cache of one layer for one sequence of `T` tokens
(`seqjax.models.state_size / num_layers`): the recurrent state and convolution tails of a
recurrent mixer, the keys and values of all `T` tokens for attention. Every mixer has
`num_heads` heads whose widths scale with `d` (`mixer_options` below), so each family's state
grows with the width (plus the last inputs of each short convolution, which the config puts
on q, k and v of every family that has them as an option):

    attention        KV cache 2 T d
    based            Taylor-map linear attention (Zoology's Based without its window: the
                     plain linear-attention baseline): H F' (d / H + 1) with the normalizer,
                     F' = 1 + F + F^2 features of F = 16 projected dimensions
    gla              H (d / 2H) (d / H)
    mamba2           2 d N,  N = state_size
    delta_net        H (d / H)^2                      (short convolution, L2-normalized q, k)
    gated_delta_net  H (d / H)^2
    mom              (M + 1) H (d / H)^2              (M memories, top-k, a shared memory)

Claims tested: recall accuracy rises with state size within a family (Zoology), and at equal
state the delta rule (DeltaNet, Gated DeltaNet) and the gated or mixed memories beat plain
linear attention (DeltaNet paper: DeltaNet > GLA >= linear attention on MQAR; MoM).
"""

from __future__ import annotations

import ml_collections

from experiments.study import (
    Row,
    Study,
    Summary,
    beats,
    check_choices,
    fail,
    fit_and_evaluate,
    main,
    plot_series,
)
from experiments.study import train_config as study_train_config
from seqjax.data.recall import MQAR
from seqjax.models import MIXERS, state_size
from seqjax.train.loop import model_config

# Plain linear attention in the registry: Based's Taylor-map linear attention, no window.
LINEAR_ATTENTION = "based"
# The families the verdict sets against plain linear attention (PAPERS.md B.1.3, B.1.5).
CHALLENGERS = ("delta_net", "gated_delta_net", "gla", "mom")


def mixer_options(mixer: str, width: int, num_heads: int, extra: dict) -> dict:
    """The options of `mixer` at model width `width`: `num_heads` heads whose widths scale
    with the model's (the defaults of Gated DeltaNet, MoM and Mamba-2 fix the head width at
    64..256 whatever the model width), then the config's `extra` options of that mixer."""
    heads = {"num_heads": num_heads}
    options = {
        "attention": heads,
        "based": heads,
        "jrt_rnn": heads,
        "gla": heads,
        "delta_net": heads,
        "gated_delta_net": {**heads, "head_dim": width // num_heads, "expand_v": 1.0},
        "mom": {**heads, "head_dim": width // num_heads, "expand_v": 1.0},
        # Mamba-2's heads split its expanded inner width (expand = 2 by default).
        "mamba2": {"head_dim": extra.get("expand", 2) * width // num_heads},
    }.get(mixer, {})
    return {**options, **extra}


def train_config(
    config: ml_collections.ConfigDict,
    mixer: str,
    width: int,
    num_kv_pairs: int,
    learning_rate: float,
    seed: int,
) -> ml_collections.ConfigDict:
    """The `seqjax.train` config of one model of the grid: MQAR with `num_kv_pairs` pairs."""
    extra = config.mixer_options.get(mixer, ml_collections.ConfigDict()).to_dict()
    task = dict(vocab_size=config.vocab_size, length=config.length, num_kv_pairs=num_kv_pairs)
    train = study_train_config(
        task="mqar",
        options={**task, "num_examples": config.train_examples},
        eval_options={"num_examples": config.eval_batches * config.batch_size},
        length=config.length,
        layers=(mixer,) * config.num_layers,
        mixer_options={mixer: mixer_options(mixer, width, config.num_heads, extra)},
        width=width,
        steps=config.train_steps,
        batch_size=config.batch_size,
        learning_rate=learning_rate,
        seed=seed,
        mesh=config.get("mesh", ml_collections.ConfigDict()).to_dict(),
    )
    train.train.eval_batches = config.eval_batches
    return train


def state_floats(train: ml_collections.ConfigDict, vocab_size: int) -> int:
    """Floats of one layer's decode cache for one sequence of `data.length` tokens."""
    model = model_config(train, vocab_size)
    return state_size(model, train.data.length) // len(model.layers)


def run(config: ml_collections.ConfigDict, seed: int) -> tuple[list[dict], None]:
    rows = []
    for mixer in config.mixers:
        for width in config.widths:
            for num_kv_pairs in config.num_kv_pairs:
                accuracies = []
                for learning_rate in config.learning_rates:
                    train = train_config(config, mixer, width, num_kv_pairs, learning_rate, seed)
                    _, summary = fit_and_evaluate(train, {})
                    accuracies.append(summary["eval"]["accuracy"])
                rows.append(
                    dict(
                        mixer=mixer,
                        width=width,
                        num_kv_pairs=num_kv_pairs,
                        accuracy=max(accuracies),
                        state_floats=state_floats(train, config.vocab_size),
                    )
                )
    return rows, None


def validate(config: ml_collections.ConfigDict) -> None:
    check_choices("mixers", config.mixers, sorted(MIXERS))
    check_choices("mixer_options", tuple(config.mixer_options), sorted(MIXERS))
    for field in ("num_layers", "num_heads", "train_steps", "batch_size", "eval_batches"):
        if config[field] < 1:
            fail(field, f"expected a positive integer, got {config[field]}")
    if not config.learning_rates or min(config.learning_rates) <= 0:
        fail("learning_rates", f"expected positive rates, got {config.learning_rates}")
    for width in config.widths:
        if width < 1 or width % config.num_heads:
            fail("widths", f"{width} is not a positive multiple of num_heads = {config.num_heads}")
    for num_kv_pairs in config.num_kv_pairs:
        try:
            MQAR(vocab_size=config.vocab_size, length=config.length, num_kv_pairs=num_kv_pairs)
        except ValueError as error:
            fail("num_kv_pairs", f"{num_kv_pairs} pairs: {error}")
    if config.train_examples < config.train_steps * config.batch_size:
        # Fewer would repeat examples: MQAR is trained on fresh draws.
        fail("train_examples", "expected at least train_steps * batch_size examples")
    for mixer in config.mixers:  # a bad option or head split fails here, before any training
        for width in config.widths:
            train = train_config(config, mixer, width, max(config.num_kv_pairs), 1e-3, 0)
            try:
                model_config(train, config.vocab_size)
            except ValueError as error:
                fail(f"mixer_options.{mixer}", f"at width {width}: {error}")


def plot(summary: Summary, figure) -> None:
    counts = sorted({row["num_kv_pairs"] for row in summary.rows})
    axes = figure.subplots(1, len(counts), sharey=True, squeeze=False)[0]
    mixers = list(dict.fromkeys(row["mixer"] for row in summary.rows))
    for ax, count in zip(axes, counts, strict=True):
        for mixer in mixers:
            rows = [r for r in summary.rows if r["mixer"] == mixer and r["num_kv_pairs"] == count]
            label = f"linear attention ({mixer})" if mixer == LINEAR_ATTENTION else mixer
            plot_series(ax, rows, "state_floats", "accuracy", label)
        ax.set(xscale="log", title=f"{count} key-value pairs", xlabel="state floats per layer")
    axes[0].set(ylabel="MQAR accuracy", ylim=(-0.02, 1.02))
    axes[-1].legend(fontsize="small")


def rises_with_state(summary: Summary) -> tuple[int, int, int]:
    """`(rising, total, saturated)` over the (mixer, kv count) series with several widths:
    rising when the largest state's accuracy exceeds the smallest's by more than noise
    (`beats`); saturated (and left out of `total`), "perfect", when even the smallest state
    recalls within the margin of accuracy 1, so that nothing is left to rise."""
    rising = total = saturated = 0
    for mixer, count in {(r["mixer"], r["num_kv_pairs"]) for r in summary.rows}:
        rows = [r for r in summary.rows if r["mixer"] == mixer and r["num_kv_pairs"] == count]
        if len(rows) < 2:
            continue
        rows.sort(key=lambda r: r["state_floats"][0])
        if not beats(1.0, rows[0]["accuracy"]):
            saturated += 1
            continue
        total += 1
        rising += beats(rows[-1]["accuracy"], rows[0]["accuracy"])
    return rising, total, saturated


def dominates(a: Row, b: Row) -> bool:
    """Whether `a` is on the better side of `b` in (state, accuracy): no more state, accuracy
    not lower beyond noise, and either less state or higher accuracy beyond noise."""
    state_a, state_b = a["state_floats"][0], b["state_floats"][0]
    if state_a > state_b or beats(b["accuracy"], a["accuracy"]):
        return False
    return state_a < state_b or beats(a["accuracy"], b["accuracy"])


def against_linear_attention(summary: Summary, mixer: str) -> tuple[int, int, int]:
    """`(wins, losses, cells)` of `mixer` against plain linear attention over the (width,
    kv count) cells both ran: a win when `mixer` `dominates` it (as accurate with less state,
    or more accurate with no more), a loss when it is dominated; other cells count as
    neither."""
    wins = losses = cells = 0
    baseline = {
        (r["width"], r["num_kv_pairs"]): r for r in summary.rows if r["mixer"] == LINEAR_ATTENTION
    }
    for row in summary.rows:
        other = baseline.get((row["width"], row["num_kv_pairs"]))
        if row["mixer"] != mixer or other is None:
            continue
        cells += 1
        wins += dominates(row, other)
        losses += dominates(other, row)
    return wins, losses, cells


def verdict(summary: Summary) -> str:
    """Whether accuracy rises with state within each family that has room to, and how the
    delta-rule and gated families fare against plain linear attention in (state, accuracy)."""
    rising, total, saturated = rises_with_state(summary)
    parts = []
    if total:
        direction = "reproduces" if rising > total / 2 else "does NOT reproduce"
        parts.append(
            f"accuracy rises from the smallest to the largest state in {rising} of {total} "
            f"(mixer, kv pairs) series: the state-size direction {direction}"
            + (f" ({saturated} more are perfect at their smallest state)" if saturated else "")
        )
    elif saturated:
        parts.append(f"all {saturated} series are perfect at their smallest state: no direction")
    mixers = {row["mixer"] for row in summary.rows}
    for mixer in CHALLENGERS:
        if mixer not in mixers or LINEAR_ATTENTION not in mixers:
            continue
        wins, losses, cells = against_linear_attention(summary, mixer)
        if not cells:
            continue
        outcome = "beats" if wins > losses else "does NOT beat" if losses > wins else "ties"
        parts.append(
            f"{mixer} {outcome} linear attention ({LINEAR_ATTENTION}): as accurate with less "
            f"state or more accurate with no more in {wins} of {cells} cells, the reverse in "
            f"{losses}"
        )
    return "; ".join(parts) + "." if parts else "no series to compare."


STUDY = Study(
    number=2,
    name="recall",
    title="Recall versus state size",
    claim=(
        "Arora, Eyuboglu et al. (Zoology, 2023): on multi-query associative recall, the "
        "accuracy of efficient (recurrent) models rises with their recurrent state size, while "
        "attention recalls with its KV cache; the DeltaNet paper (Yang et al., 2024) and MoM "
        "(Du et al., 2025) find that delta-rule, gated and mixture-of-memories layers recall "
        "better than plain linear attention at a comparable state (DeltaNet > GLA >= linear "
        "attention)."
    ),
    keys=("mixer", "width", "num_kv_pairs"),
    metrics=("accuracy", "state_floats"),
    run=run,
    validate=validate,
    plot=plot,
    verdict=verdict,
)

if __name__ == "__main__":
    main(STUDY)
