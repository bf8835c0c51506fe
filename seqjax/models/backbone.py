"""The backbone every model of `seqjax.models` shares: input embedding, a stack of residual
mixer blocks, final norm. Hybrids are configuration.

    block:  x = x + mixer(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))   (the MLP only where the
            mixer's paper block has one: Mamba's and xLSTM's blocks are the mixer alone)

`layers` names each layer's mixer (`MIXERS`), e.g. `("gla",) * 3 + ("attention",)` repeated
six times. When the layers are a group repeated `n > 1` times and `scan_layers` is set, the
groups run under `nn.scan` (parameters and caches stacked along a leading axis of length `n`),
so compile time does not grow with depth. `remat` rematerializes each block in the backward
pass (`"full"`, or `"dots"`: keep matmul outputs).

Two kinds of mixer depend on the depth:
- a config with fields `layer_idx` and `num_layers` (TransNormer's per-layer decay) gets them
  filled per layer; the layers then differ, so such a stack repeats no group and is not
  scanned;
- HGRN's forget-gate lower bounds are one model-level parameter `[L, D]` per such kind
  (`lower_bounds_<kind>`, zeros at init): `softmax` over its layers, cumulative sum, minus the
  first row, so the bound grows with depth and the first layer has none. Row `l` goes to that
  kind's `l`-th layer as its `lower_bound`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from seqjax.nn.aaren import Aaren, AarenConfig
from seqjax.nn.attention import Attention, AttentionConfig
from seqjax.nn.based import JRTRNN, Based, BasedConfig, JRTRNNConfig
from seqjax.nn.delta_net import DeltaNet, DeltaNetConfig
from seqjax.nn.diagonal_lrnn import DiagonalLRNN, DiagonalLRNNConfig
from seqjax.nn.gated_delta_net import GatedDeltaNet, GatedDeltaNetConfig
from seqjax.nn.gla import GLA, GLAConfig
from seqjax.nn.hgrn import HGRN, HGRNConfig
from seqjax.nn.hgrn2 import HGRN2, HGRN2Config
from seqjax.nn.layers import RMSNorm, SwiGLU, dense
from seqjax.nn.lightnet import LightNet, LightNetConfig
from seqjax.nn.linearized_attention import (
    Hedgehog,
    HedgehogConfig,
    Liger,
    LigerConfig,
    LoLCATs,
    LoLCATsConfig,
)
from seqjax.nn.mamba import Mamba, MambaConfig
from seqjax.nn.mamba2 import Mamba2, Mamba2Config
from seqjax.nn.mixer import frozen, positive, require
from seqjax.nn.mlstm import MLSTM, MLSTMConfig
from seqjax.nn.mom import MoM, MoMConfig
from seqjax.nn.ngram import Ngram, NgramConfig
from seqjax.nn.retnet import RetNet, RetNetConfig
from seqjax.nn.rg_lru import RGLRU, RGLRUConfig
from seqjax.nn.rnn import GRU, LSTM, SLSTM, GRUConfig, LSTMConfig, SLSTMConfig
from seqjax.nn.ssm import LRU, S4, S4D, S5, LRUConfig, S4Config, S4DConfig, S5Config
from seqjax.nn.transnormer import TransNormer, TransNormerConfig

MIXERS: dict[str, tuple[type, type]] = {
    "attention": (AttentionConfig, Attention),
    "gla": (GLAConfig, GLA),
    "delta_net": (DeltaNetConfig, DeltaNet),
    "gated_delta_net": (GatedDeltaNetConfig, GatedDeltaNet),
    "mamba": (MambaConfig, Mamba),
    "mamba2": (Mamba2Config, Mamba2),
    "hedgehog": (HedgehogConfig, Hedgehog),
    "based": (BasedConfig, Based),
    "lolcats": (LoLCATsConfig, LoLCATs),
    "liger": (LigerConfig, Liger),
    "jrt_rnn": (JRTRNNConfig, JRTRNN),
    "aaren": (AarenConfig, Aaren),
    "retnet": (RetNetConfig, RetNet),
    "transnormer": (TransNormerConfig, TransNormer),
    "lightnet": (LightNetConfig, LightNet),
    "hgrn": (HGRNConfig, HGRN),
    "hgrn2": (HGRN2Config, HGRN2),
    "s4": (S4Config, S4),
    "s4d": (S4DConfig, S4D),
    "s5": (S5Config, S5),
    "lru": (LRUConfig, LRU),
    "rg_lru": (RGLRUConfig, RGLRU),
    "diagonal_lrnn": (DiagonalLRNNConfig, DiagonalLRNN),
    "mlstm": (MLSTMConfig, MLSTM),
    "slstm": (SLSTMConfig, SLSTM),
    "lstm": (LSTMConfig, LSTM),
    "gru": (GRUConfig, GRU),
    "mom": (MoMConfig, MoM),
    "ngram": (NgramConfig, Ngram),
}
# Mixers whose paper block has no MLP after the mixer.
WITHOUT_MLP: frozenset[str] = frozenset(
    {"mamba", "mamba2", "s4", "s4d", "s5", "lru", "diagonal_lrnn", "mlstm"}
)
# Mixers that take a model-level forget-gate `lower_bound` of width `config.lower_bound_width`.
LOWER_BOUNDED: frozenset[str] = frozenset({"hgrn", "hgrn2"})
DEPTH_FIELDS = ("layer_idx", "num_layers")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


@frozen
class BackboneConfig:
    """What every model shares: the input and the stack of blocks. `vocab_size`: token inputs
    are embedded (None: inputs are feature vectors `[B, T, F]`, projected to the width).
    `layers`: one mixer name per layer. `mixer_options`: per mixer name, the fields of its
    config that differ from the paper's defaults (`width` is the stack's; depth fields are
    filled). `mlp`: None gives each block its paper's MLP or none; True or False forces it.
    `mlp_hidden`: None means 8/3 of the width rounded up to a multiple of `mlp_multiple_of`
    (Llama's SwiGLU)."""

    vocab_size: int | None
    width: int
    layers: tuple[str, ...]
    mixer_options: Any = dataclasses.field(default_factory=dict)
    mlp: bool | None = None
    mlp_hidden: int | None = None
    mlp_multiple_of: int = 64
    norm_eps: float = 1e-6
    scan_layers: bool = True
    remat: str = "none"

    def __post_init__(self):
        # Frozen and hashable, so a config can be a static argument of `jit`.
        object.__setattr__(self, "layers", tuple(self.layers))
        options = {name: FrozenDict(o) for name, o in dict(self.mixer_options).items()}
        object.__setattr__(self, "mixer_options", FrozenDict(options))
        positive(self, "width", "mlp_multiple_of")
        if self.vocab_size is not None:
            positive(self, "vocab_size")
        require(len(self.layers) > 0, "layers", "expected at least one layer")
        for name in self.layers:
            message = f"unknown mixer {name!r}, expected one of {sorted(MIXERS)}"
            require(name in MIXERS, "layers", message)
        for name in self.mixer_options:
            require(name in MIXERS, "mixer_options", f"unknown mixer {name!r}")
        require(self.remat in REMAT_POLICIES, "remat", f"expected one of {list(REMAT_POLICIES)}")
        if self.mlp_hidden is not None:
            positive(self, "mlp_hidden")
        # Builds every mixer config, used or not: a bad option fails here, naming its field.
        self.layer_specs(tuple(self.mixer_options))
        self.layer_specs()

    def layer_specs(self, layers: tuple[str, ...] | None = None) -> tuple[tuple[str, Any], ...]:
        """`(mixer name, mixer config)` per layer (of `self.layers` unless given)."""
        layers = self.layers if layers is None else layers
        specs = []
        for index, name in enumerate(layers):
            config_class = MIXERS[name][0]
            options = dict(self.mixer_options.get(name, {}))
            fields = {f.name for f in dataclasses.fields(config_class)}
            for key in options:
                settable = key in fields and key != "width" and key not in DEPTH_FIELDS
                message = f"not a settable field of {config_class.__name__}"
                require(settable, f"mixer_options.{name}.{key}", message)
            if set(DEPTH_FIELDS) <= fields:
                options.update(layer_idx=index, num_layers=len(layers))
            try:
                specs.append((name, config_class(width=self.width, **options)))
            except ValueError as error:
                raise ValueError(f"mixer_options.{name}.{error}") from None
        return tuple(specs)

    def block_hidden(self, name: str) -> int:
        """The MLP width of a block of mixer `name`; 0 for a block without MLP."""
        if not (name not in WITHOUT_MLP if self.mlp is None else self.mlp):
            return 0
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        multiple = self.mlp_multiple_of
        return -(-(8 * self.width // 3) // multiple) * multiple


def period(layers: tuple) -> int:
    """The length of the shortest group that `layers` repeats."""
    n = len(layers)
    return next(p for p in range(1, n + 1) if n % p == 0 and layers == layers[:p] * (n // p))


class Block(nn.Module):
    """Pre-norm residual block: the mixer, then (when `hidden > 0`) the SwiGLU MLP."""

    mixer: Any  # a mixer config
    kind: str
    hidden: int
    norm_eps: float

    @nn.compact
    def __call__(self, x, segment_ids, positions, cache, lower_bound=None):
        mixer = MIXERS[self.kind][1](self.mixer, name="mixer")
        extra = {} if lower_bound is None else {"lower_bound": lower_bound}
        h, cache = mixer(
            RMSNorm(self.norm_eps, name="mixer_norm")(x),
            segment_ids=segment_ids,
            positions=positions,
            cache=cache,
            **extra,
        )
        x = x + h
        if self.hidden:
            x = x + SwiGLU(self.hidden, name="mlp")(RMSNorm(self.norm_eps, name="mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), cache


class Group(nn.Module):
    """One period of the layers: blocks in order, each with its own cache. `lower_bounds`:
    per lower-bounded kind, `[n, D]` for that kind's `n` blocks of the group."""

    blocks: tuple[tuple[str, Any, int], ...]  # (kind, mixer config, MLP width) per block
    norm_eps: float
    remat: str
    scanned: bool  # under nn.scan, which keeps XLA from undoing the rematerialization

    @nn.compact
    def __call__(self, x, segment_ids, positions, caches, lower_bounds):
        block_class = Block
        if self.remat != "none":
            policy = REMAT_POLICIES[self.remat]
            block_class = nn.remat(Block, policy=policy, prevent_cse=not self.scanned)
        caches = (None,) * len(self.blocks) if caches is None else caches
        seen = dict.fromkeys(lower_bounds, 0)
        new = []
        for index, ((kind, config, hidden), cache) in enumerate(
            zip(self.blocks, caches, strict=True)
        ):
            bound = None
            if kind in lower_bounds:
                bound, seen[kind] = lower_bounds[kind][seen[kind]], seen[kind] + 1
            block = block_class(config, kind, hidden, self.norm_eps, name=f"block_{index}")
            x, cache = block(x, segment_ids, positions, cache, bound)
            new.append(cache)
        return x, tuple(new)


def cumulative_lower_bounds(logits: jax.Array) -> jax.Array:
    """HGRN's bounds from `[L, D]` logits: `cumsum(softmax(logits, 0)) - softmax(logits)[0]`."""
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=0)
    return jnp.cumsum(weights, axis=0) - weights[0]


class Backbone(nn.Module):
    """Inputs to final features: embed tokens `[B, T]` (or project features `[B, T, F]` when
    `vocab_size` is None), the blocks, the final RMSNorm. Returns `(h [B, T, D], caches)`."""

    config: BackboneConfig

    def setup(self):
        c = self.config
        specs = c.layer_specs()
        size = period(specs)
        self.repeats = len(specs) // size
        blocks = tuple((name, config, c.block_hidden(name)) for name, config in specs[:size])
        self.scanned = c.scan_layers and self.repeats > 1
        if c.vocab_size is None:
            self.embed = dense(c.width, (None, "embed"), "embed", use_bias=True)
        else:
            self.embed = nn.Embed(
                c.vocab_size,
                c.width,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(0.02), ("vocab", "embed")
                ),
            )
        self.bound_logits = {
            kind: self.param(
                f"lower_bounds_{kind}",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                (sum(name == kind for name, _ in specs), config.lower_bound_width),
            )
            for kind, config in dict(specs).items()
            if kind in LOWER_BOUNDED
        }
        if self.scanned:
            scanned = nn.scan(
                Group,
                # Sown values (MoM's load-balancing loss) stack along the layers too.
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, 0),
                length=self.repeats,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.groups = scanned(blocks, c.norm_eps, c.remat, True)
        else:
            self.groups = [Group(blocks, c.norm_eps, c.remat, False) for _ in range(self.repeats)]
        self.norm = RMSNorm(c.norm_eps)

    def __call__(self, inputs, segment_ids, positions, caches):
        if self.config.vocab_size is None:
            x = self.embed(inputs)
        else:
            # The table whole along embed (FSDP's all-gather, made explicit): the partitioner
            # gathers rows of a vocab-sharded table, but from the embed-sharded one it fell
            # back to a full rematerialization under a batch- and sequence-sharded input.
            table = nn.with_logical_constraint(self.embed.embedding, ("vocab", None))
            x = jnp.take(table, inputs, axis=0)
        bounds = {
            kind: cumulative_lower_bounds(logits).reshape(self.repeats, -1, logits.shape[-1])
            for kind, logits in self.bound_logits.items()
        }
        if self.scanned:
            x, caches = self.groups(x, segment_ids, positions, caches, bounds)
        else:
            caches = (None,) * self.repeats if caches is None else caches
            new = []
            for index, (group, group_cache) in enumerate(zip(self.groups, caches, strict=True)):
                group_bounds = {kind: b[index] for kind, b in bounds.items()}
                x, group_cache = group(x, segment_ids, positions, group_cache, group_bounds)
                new.append(group_cache)
            caches = tuple(new)
        return self.norm(x), caches

    def init_cache(self, batch_size: int, max_length: int, dtype=jnp.float32):
        """The caches before any token (call on the unbound module: no parameters needed)."""
        c = self.config
        specs = c.layer_specs()
        size = period(specs)
        repeats = len(specs) // size
        group = tuple(
            MIXERS[name][1](config, parent=None).init_cache(batch_size, max_length, dtype)
            for name, config in specs[:size]
        )
        if c.scan_layers and repeats > 1:
            return jax.tree.map(lambda x: jnp.stack([x] * repeats), group)
        return (group,) * repeats
