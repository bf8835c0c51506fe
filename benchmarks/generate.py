"""Decoding cost against context length: a recurrent model (GLA) and softmax attention of the
same size, through the engine's own jitted decode loop (`seqjax.generate.engine.decode`).

    python -m benchmarks.generate [--contexts 1024,4096,16384,65536] [--batches 1,16]

For each model, batch and context length, the cache is synthesized as if `context` tokens had
been prefilled (random keys, values and states; attention caches hold `context` filled slots
of `context + steps`): decoding costs the same whatever the cached values are, and prefilling
64K tokens per point would dominate the run. Then `--steps` tokens are decoded greedily and
timed (median of `--repeats`, the models interleaved); the table gives milliseconds per step
(all rows of the batch), tokens per second, and the cache's size. The recurrent model's rows
must be flat in the context; the attention model's grow linearly, and the table shows where
they cross. Prefill throughput is measured separately on a real prompt of `--prefill`
tokens.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from benchmarks.common import fmt_bytes, markdown_table
from seqjax.generate.engine import DecodeState, decode, prefill
from seqjax.generate.samplers import Sampler
from seqjax.models import LanguageModelConfig, build
from seqjax.ops.attention import KVCache

GREEDY = Sampler(greedy=True)


def models(layers: int, width: int, vocab: int) -> dict[str, tuple]:
    """`name -> (model, params)`: GLA with 4 heads (its paper's width ratios) and Llama-style
    attention with 8 heads of width / 8, both with SwiGLU MLPs, the same depth and width."""
    configs = {
        "gla": LanguageModelConfig(
            vocab, width, ("gla",) * layers, mixer_options={"gla": {"num_heads": 4}}
        ),
        "attention": LanguageModelConfig(
            vocab, width, ("attention",) * layers, mixer_options={"attention": {"num_heads": 8}}
        ),
    }
    built = {}
    for name, config in configs.items():
        model = build(config)
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
        built[name] = (model, params)
    return built


def synthesized_cache(model, batch: int, context: int, steps: int, dtype):
    """The model's cache as if `context` tokens had been seen: random floats everywhere,
    attention caches with slots `[0, context)` filled, positions at `context`."""
    cache = model.init_cache(batch, context + steps, dtype)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(cache))))

    def fill(leaf):
        if isinstance(leaf, KVCache):
            slots = jnp.arange(leaf.positions.shape[-1], dtype=jnp.int32)
            positions = jnp.broadcast_to(
                jnp.where(slots < context, slots, -1), leaf.positions.shape
            )
            return KVCache(
                fill(leaf.k), fill(leaf.v), positions, jnp.full(leaf.length.shape, context)
            )
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return jnp.full(leaf.shape, context, leaf.dtype)
        return (0.1 * jax.random.normal(next(keys), leaf.shape)).astype(leaf.dtype)

    return jax.tree.map(fill, cache, is_leaf=lambda x: isinstance(x, KVCache))


def decode_state(cache, batch: int, vocab: int, steps: int) -> DecodeState:
    return DecodeState(
        step=jnp.zeros((), jnp.int32),
        logits=jnp.zeros((batch, vocab), jnp.float32),
        cache=cache,
        sampler_state=(),
        rng=jax.random.key(0),
        tokens=jnp.zeros((batch, steps), jnp.int32),
        log_probs=jnp.zeros((batch, steps), jnp.float32),
        done=jnp.zeros((batch,), bool),
        lengths=jnp.zeros((batch,), jnp.int32),
    )


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", help="cache dtype")
    parser.add_argument(
        "--max-cache-gib", type=float, default=8.0, help="skip points whose cache is larger"
    )
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    built = models(args.layers, args.width, args.vocab)
    rows = []
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            times, sizes = {}, {}
            for name, (model, params) in built.items():
                shapes = jax.eval_shape(
                    functools.partial(synthesized_cache, model, batch, context, args.steps, dtype)
                )
                sizes[name] = sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes))
                if sizes[name] > args.max_cache_gib * 2**30:
                    continue
                state = decode_state(
                    synthesized_cache(model, batch, context, args.steps, dtype),
                    batch,
                    args.vocab,
                    args.steps,
                )

                def run(model=model, params=params, state=state):
                    return decode(
                        model, params, state, sampler=GREEDY, stop_tokens=(), pad_token=0
                    ).tokens

                times[name] = timed(run, args.repeats)
                del state
            for name in built:
                if name not in times:
                    rows.append([name, batch, context, "skipped", "", fmt_bytes(sizes[name])])
                    continue
                step_ms = 1e3 * times[name] / args.steps
                rate = batch * args.steps / times[name]
                rows.append(
                    [name, batch, context, f"{step_ms:.2f}", f"{rate:,.0f}", fmt_bytes(sizes[name])]
                )
    print(
        f"decode: {args.layers} layers, width {args.width}, vocab {args.vocab}, "
        f"{args.steps} greedy steps per timing, cache {args.dtype}, {jax.devices()[0].platform}"
    )
    headers = ["model", "batch", "context", "ms / step", "tokens / s", "cache"]
    print(markdown_table(headers, rows))
    prefill_rows = []
    prompt = jax.random.randint(jax.random.key(2), (1, args.prefill), 0, args.vocab)
    lengths = jnp.array([args.prefill], jnp.int32)
    for name, (model, params) in built.items():

        def run(model=model, params=params):
            return prefill(
                model,
                params,
                prompt,
                lengths,
                jax.random.key(0),
                sampler=GREEDY,
                max_new_tokens=1,
                capacity=args.prefill + 1,
                cache_dtype=dtype,
            ).logits

        seconds = timed(run, args.repeats)
        prefill_rows.append([name, args.prefill, f"{args.prefill / seconds:,.0f}"])
    print(f"\nprefill, batch 1, {args.prefill} tokens")
    print(markdown_table(["model", "prompt", "tokens / s"], prefill_rows))


if __name__ == "__main__":
    main()
