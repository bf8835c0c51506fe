"""Input validation shared by every op: shapes at call time, values when they can be seen.

Shapes, ranks and dtypes are static, so they are always checked, and the error names the
argument and the layout it should have (`g: expected [B, T, D] = [2, 16, 8], got (2, 16, 4)`).

Values (a positive log-decay, a decay outside [-1, 1]) are only known when the arrays are
concrete. Outside `jit` they are checked eagerly and raise `ValueError`. Under `jit` they are
skipped, unless the caller opts in with `checkify_values()`: the checks then become
`jax.experimental.checkify` checks, which the caller surfaces with `checkify.checkify(fn)`.
Nothing here ever puts a host callback in the hot path.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_CHECKIFY = contextvars.ContextVar("seqjax_checkify_values", default=False)


@contextlib.contextmanager
def checkify_values() -> Iterator[None]:
    """Within this context, value checks traced under `jit` become `checkify` checks.

    The mode is read when a function is traced: a function jitted inside the context keeps its
    checks when called later (and one jitted outside has none).

    Example::

        with seqjax.checks.checkify_values():
            err, out = checkify.checkify(jax.jit(f))(x)
        err.throw()
    """
    token = _CHECKIFY.set(True)
    try:
        yield
    finally:
        _CHECKIFY.reset(token)


class Dims:
    """Binds the letters of shape layouts (`"B T H K"`) to sizes as arguments are checked.

    The first argument that uses a letter fixes its size; every later argument must agree.
    """

    def __init__(self, **known: int):
        self.sizes: dict[str, int] = dict(known)

    def check(self, name: str, x: jax.Array, layout: str) -> None:
        """Checks that `x` (argument `name`) has the layout `layout`, e.g. `"B T D"`."""
        letters = layout.split()
        shape = tuple(np.shape(x))
        if len(shape) != len(letters) or any(
            letter in self.sizes and self.sizes[letter] != size
            for letter, size in zip(letters, shape, strict=False)
        ):
            raise ValueError(f"{name}: expected shape {self.describe(letters)}, got {shape}")
        for letter, size in zip(letters, shape, strict=True):
            self.sizes.setdefault(letter, size)

    def describe(self, letters: Sequence[str]) -> str:
        known = [str(self.sizes.get(letter, "?")) for letter in letters]
        return f"[{', '.join(letters)}] = [{', '.join(known)}]"


def check_floating(name: str, x: jax.Array, *, allow_complex: bool = False) -> None:
    """Rejects integer or boolean arrays where a real (or complex) float is expected."""
    dtype = jnp.result_type(x)
    ok = jnp.issubdtype(dtype, jnp.floating) or (
        allow_complex and jnp.issubdtype(dtype, jnp.complexfloating)
    )
    if not ok:
        kind = "a float or complex" if allow_complex else "a float"
        raise TypeError(f"{name}: expected {kind} array, got dtype {dtype}")


def check_tokens(name: str, tokens: jax.Array) -> None:
    """`tokens` must be an integer array `[B, T]` of token ids."""
    if np.ndim(tokens) != 2:
        raise ValueError(f"{name}: expected token ids [B, T], got shape {np.shape(tokens)}")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        dtype = jnp.result_type(tokens)
        raise TypeError(f"{name}: expected integer token ids [B, T], got dtype {dtype}")


def check_segment_ids(segment_ids: jax.Array | None, batch: int, length: int) -> None:
    """`segment_ids` must be an integer array `[B, T]`."""
    if segment_ids is None:
        return
    if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        dtype = jnp.result_type(segment_ids)
        raise TypeError(f"segment_ids: expected an integer array [B, T], got dtype {dtype}")
    if tuple(np.shape(segment_ids)) != (batch, length):
        raise ValueError(
            f"segment_ids: expected shape [B, T] = [{batch}, {length}], got {np.shape(segment_ids)}"
        )


def check_positions(positions: jax.Array, batch: int, length: int) -> jax.Array:
    """Token positions `[B, P]`: integers in [0, T) (the values checked when concrete)."""
    positions = jnp.asarray(positions)
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(
            f"positions: expected shape [B, P] with B = {batch}, got {positions.shape}"
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(f"positions: expected an integer array, got {positions.dtype}")
    check_values(
        "positions", (positions >= 0) & (positions < length), f"0 <= positions < T = {length}"
    )
    return positions


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Rejects a value outside a fixed set of choices (an `impl=`, a discretization)."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def check_at_least(name: str, value: int, minimum: int, meaning: str = "") -> None:
    """Rejects anything but an integer `>= minimum`; `meaning` says what the bound is."""
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        bound = f"{minimum} ({meaning})" if meaning else f"{minimum}"
        raise ValueError(f"{name}: expected an integer >= {bound}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}: expected a bool, got {value!r}")


def check_values(name: str, ok: jax.Array, expected: str) -> None:
    """Checks a condition on values: eagerly when concrete, via checkify when opted in."""
    if isinstance(ok, jax.core.Tracer):
        if _CHECKIFY.get():
            checkify.check(jnp.all(ok), f"{name}: expected {expected}")
        return
    if not bool(jnp.all(ok)):
        raise ValueError(f"{name}: expected {expected}")
