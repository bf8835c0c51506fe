"""A causal language model whose layers are any mixers: hybrids are configuration.

    tokens -> embed -> [block] * L -> RMSNorm -> head (tied to the embedding or not)
    block:  x = x + mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))

`layers` names each layer's mixer (`MIXERS`), e.g. `("gla",) * 3 + ("attention",)` repeated
six times. When `layers` is a group repeated `n > 1` times and `scan_layers` is set, the groups
run under `nn.scan` (parameters and caches stacked along a leading axis of length `n`), so
compile time does not grow with depth. `remat` rematerializes each block in the backward pass
(`"full"`, or `"dots"`: keep matmul outputs). The model's cache holds every layer's cache and
the number of tokens seen, from which positions continue.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.nn.delta_net import DeltaNet, DeltaNetConfig
from seqjax.nn.gated_delta_net import GatedDeltaNet, GatedDeltaNetConfig
from seqjax.nn.gla import GLA, GLAConfig
from seqjax.nn.layers import RMSNorm, SwiGLU, dense
from seqjax.nn.mixer import default_positions, frozen, positive, require

MIXERS: dict[str, tuple[type, type]] = {
    "attention": (AttentionConfig, Attention),
    "gla": (GLAConfig, GLA),
    "delta_net": (DeltaNetConfig, DeltaNet),
    "gated_delta_net": (GatedDeltaNetConfig, GatedDeltaNet),
}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


@frozen
class LanguageModelConfig:
    """`layers`: one mixer name per layer. `mixer_options`: per mixer name, the fields of its
    config that differ from the paper's defaults (`width` is the model's). `mlp_hidden`: None
    means 8/3 of the width rounded up to a multiple of `mlp_multiple_of` (Llama's SwiGLU)."""

    vocab_size: int
    width: int
    layers: tuple[str, ...]
    mixer_options: Any = dataclasses.field(default_factory=dict)
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 64
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    scan_layers: bool = True
    remat: str = "none"

    def __post_init__(self):
        positive(self, "vocab_size", "width", "mlp_multiple_of")
        require(len(self.layers) > 0, "layers", "expected at least one layer")
        for name in self.layers:
            message = f"unknown mixer {name!r}, expected one of {sorted(MIXERS)}"
            require(name in MIXERS, "layers", message)
        for name in self.mixer_options:
            require(name in MIXERS, "mixer_options", f"unknown mixer {name!r}")
        require(self.remat in REMAT_POLICIES, "remat", f"expected one of {list(REMAT_POLICIES)}")
        self.mixer_configs()  # builds them: a bad option fails here, naming its field

    def mixer_configs(self) -> dict[str, Any]:
        """Mixer name -> its config, for the names in `layers`."""
        configs = {}
        for name in dict.fromkeys(self.layers):
            config_class = MIXERS[name][0]
            options = dict(self.mixer_options.get(name, {}))
            fields = {f.name for f in dataclasses.fields(config_class)}
            for key in options:
                message = f"not a field of {config_class.__name__}"
                require(key in fields and key != "width", f"mixer_options.{name}.{key}", message)
            try:
                configs[name] = config_class(width=self.width, **options)
            except ValueError as error:
                raise ValueError(f"mixer_options.{name}.{error}") from None
        return configs

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        multiple = self.mlp_multiple_of
        return -(-(8 * self.width // 3) // multiple) * multiple


def period(layers: tuple[str, ...]) -> int:
    """The shortest group that `layers` repeats."""
    n = len(layers)
    return next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))


class Block(nn.Module):
    """Pre-norm residual block: the mixer, then the SwiGLU MLP."""

    mixer: Any  # a mixer config
    kind: str
    hidden: int
    norm_eps: float

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache):
        mixer = MIXERS[self.kind][1](self.mixer, name="mixer")
        h, cache = mixer(
            RMSNorm(self.norm_eps, name="mixer_norm")(x),
            segment_ids=segment_ids,
            positions=positions,
            cache=cache,
        )
        x = x + h
        x = x + SwiGLU(self.hidden, name="mlp")(RMSNorm(self.norm_eps, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Group(nn.Module):
    """One period of `layers`: blocks in order, each with its own cache."""

    blocks: tuple[tuple[str, Any], ...]  # (kind, mixer config) per block
    hidden: int
    norm_eps: float
    remat: str

    @nn.compact
    def __call__(self, x, segment_ids, positions, caches):
        block_class = Block
        if self.remat != "none":
            block_class = nn.remat(Block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        caches = (None,) * len(self.blocks) if caches is None else caches
        new = []
        for index, ((kind, config), cache) in enumerate(zip(self.blocks, caches, strict=True)):
            block = block_class(config, kind, self.hidden, self.norm_eps, name=f"block_{index}")
            x, cache = block(x, segment_ids, positions, cache)
            new.append(cache)
        return x, tuple(new)


class LanguageModelCache(NamedTuple):
    """Every group's block caches (stacked along a leading axis under `scan_layers`) and the
    number of tokens seen `[B]`."""

    layers: Any
    length: jax.Array


class LanguageModel(nn.Module):
    config: LanguageModelConfig

    def setup(self):
        c = self.config
        configs = c.mixer_configs()
        size = period(c.layers)
        self.repeats = len(c.layers) // size
        blocks = tuple((name, configs[name]) for name in c.layers[:size])
        self.scanned = c.scan_layers and self.repeats > 1
        self.embed = nn.Embed(
            c.vocab_size,
            c.width,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
        )
        if self.scanned:
            scanned = nn.scan(
                Group,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=self.repeats,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.groups = scanned(blocks, c.hidden, c.norm_eps, c.remat)
        else:
            self.groups = [
                Group(blocks, c.hidden, c.norm_eps, c.remat) for _ in range(self.repeats)
            ]
        self.norm = RMSNorm(c.norm_eps)
        if not c.tie_embeddings:
            self.head = dense(c.vocab_size, ("embed", "vocab"), "head")

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: LanguageModelCache | None = None,
    ) -> tuple[jax.Array, LanguageModelCache]:
        """`tokens: [B, T]` int -> `(logits [B, T, vocab] float32, cache)`."""
        batch, length = tokens.shape
        seen = None if cache is None else cache.length
        if positions is None:
            positions = default_positions(batch, length, segment_ids, seen)
        x = self.embed(tokens)
        caches = None if cache is None else cache.layers
        if self.scanned:
            x, caches = self.groups(x, segment_ids, positions, caches)
        else:
            caches = (None,) * self.repeats if caches is None else caches
            new = []
            for group, group_cache in zip(self.groups, caches, strict=True):
                x, group_cache = group(x, segment_ids, positions, group_cache)
                new.append(group_cache)
            caches = tuple(new)
        x = self.norm(x)
        if self.config.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.head(x)
        start = jnp.zeros((batch,), jnp.int32) if seen is None else seen
        return logits.astype(jnp.float32), LanguageModelCache(caches, start + length)

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
        """The cache before any token (call on the unbound module: no parameters needed)."""
        c = self.config
        configs = c.mixer_configs()
        size = period(c.layers)
        repeats = len(c.layers) // size
        group = tuple(
            MIXERS[name][1](configs[name], parent=None).init_cache(batch_size, max_length, dtype)
            for name in c.layers[:size]
        )
        if c.scan_layers and repeats > 1:
            layers = jax.tree.map(lambda x: jnp.stack([x] * repeats), group)
        else:
            layers = (group,) * repeats
        return LanguageModelCache(layers, jnp.zeros((batch_size,), jnp.int32))
