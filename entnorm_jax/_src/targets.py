"""Targets that say their unit: the keywords every public function and module takes.

A call names exactly one of

* ``target_entropy=`` (nats) or ``target_fraction=`` (a fraction f of each row's largest entropy,
  ``H_t = f · log(n_valid)``): an exact target;
* the bounds ``min_entropy=`` / ``max_entropy=`` (nats) and ``min_fraction=`` / ``max_fraction=``
  (fractions), alone or a floor with a ceiling: a row whose softmax entropy H(γ=1) lies inside them
  is left as ``softmax(z)``, a row outside is normalized to the bound it crosses.

A fraction is multiplied by ``log(n_valid)`` inside the solve, so masks are honoured. Targets that
a row cannot reach are clamped to [log m, log n_valid] (m: entries tied at the maximum); values
with no meaning (a fraction outside [0, 1], negative nats) raise a ``ValueError`` naming the unit
and the other keyword when they are concrete, and give NaN rows when they are traced (a traced
value cannot raise). A NaN target gives a NaN row. A concrete floor above a concrete ceiling of
the same unit raises; where a floor still lies above its ceiling in some row (traced bounds, or a
floor and a ceiling in different units on a short row), the ceiling wins.

Internally a target travels as an array of per-row values (``[...]``, or ``[..., 2]`` for a
``(floor, ceiling)`` pair) and a static :class:`Spec` that names its keywords and units.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entnorm_jax._src.inputs import broadcasts, concrete

EXACT = ("target_entropy", "target_fraction")
BOUNDS = ("min_entropy", "max_entropy", "min_fraction", "max_fraction")
KEYWORDS = EXACT + BOUNDS

# Keywords that are gone, and what to write instead.
REMOVED = {
  "relative": (
    "relative= was removed: target_entropy= is always nats; for a fraction of log(n_valid) pass "
    "target_fraction= instead (target_entropy=x, relative=True becomes target_fraction=x)"
  ),
  "ceiling": (
    "ceiling= was removed: an upper bound on the entropy is max_entropy= (nats) or "
    "max_fraction= (a fraction of log(n_valid)); rows already below it keep temperature 1"
  ),
}


class Spec(NamedTuple):
  """Which keywords a target came from (static, hashable).

  Attributes:
    names: ``(name,)`` for an exact target, ``(floor_name, ceiling_name)`` for bounds.
    fraction: per name, whether the value is a fraction of log(n_valid) (else nats).
  """

  names: tuple[str, ...]
  fraction: tuple[bool, ...]

  @property
  def bounded(self) -> bool:
    return len(self.names) == 2

  def relative(self) -> jax.Array:
    """The per-row unit flag the solve takes: a boolean scalar, or ``[2]`` for bounds."""
    return jnp.asarray(self.fraction[0] if not self.bounded else self.fraction)


def _is_fraction(name: str) -> bool:
  return name.endswith("fraction")


def other_unit(name: str) -> str:
  """The keyword of the same role in the other unit."""
  if _is_fraction(name):
    return name.replace("fraction", "entropy")
  return name.replace("entropy", "fraction")


def reject_removed(kwargs: dict[str, Any], where: str) -> None:
  """Raises for a removed keyword (naming its replacement) or an unknown one (``TypeError``)."""
  for name in kwargs:
    if name in REMOVED:
      raise ValueError(f"{where}: {REMOVED[name]}")
  if kwargs:
    raise TypeError(f"{where}() got unexpected keyword argument(s) {sorted(kwargs)}")


def check_value(name: str, value) -> None:
  """Raises if a concrete ``value`` of keyword ``name`` has no meaning in its unit (NaN passes:
  it gives a NaN row)."""
  v = concrete(value)
  if v is None:
    return
  if _is_fraction(name):
    bad = (v < 0) | (v > 1)
    if np.any(bad):
      raise ValueError(
        f"{name} is a fraction of log(n_valid) and must lie in [0, 1], got "
        f"{_show(v, bad)}; for a value in nats use {other_unit(name)}="
      )
  else:
    bad = v < 0
    if np.any(bad):
      raise ValueError(
        f"{name} is in nats and must be >= 0, got {_show(v, bad)}; for a fraction of "
        f"log(n_valid) use {other_unit(name)}="
      )


def _show(v: np.ndarray, bad: np.ndarray):
  return float(v) if v.ndim == 0 else np.unique(v[bad])[:5].tolist()


def parse(
  where: str, default: str | None = None, default_value=None, *, removed=None, **given
) -> tuple[Any, Spec]:
  """The target of a call from its keywords (those not given are ``None``).

  Args:
    where: the function's name, for messages.
    default: the keyword assumed when none is given (``None``: one is required).
    default_value: its value.
    removed: the call's other keywords (its ``**removed``), rejected by :func:`reject_removed`.
    **given: the values of :data:`KEYWORDS`.

  Returns:
    ``(value, spec)``: ``value`` the exact target, or a ``(floor, ceiling)`` pair with the missing
    one as 0 nats (no floor) or ``inf`` nats (no ceiling).

  Raises:
    ValueError: for none or several of the exact keywords, an exact target with bounds, two bounds
      of one side, a value with no meaning in its unit, a floor above a ceiling, or a removed
      keyword (naming its replacement).
    TypeError: for an unknown keyword in ``removed``.
  """
  reject_removed(removed or {}, where)
  named = {n: v for n, v in given.items() if v is not None}
  exact = [n for n in EXACT if n in named]
  bounds = [n for n in BOUNDS if n in named]
  if not named:
    if default is None:
      raise ValueError(
        f"{where} needs a target: target_entropy= (nats) or target_fraction= (a fraction of "
        "log(n_valid)), or entropy bounds min_entropy= / max_entropy= (min_fraction= / "
        "max_fraction=)"
      )
    named, exact = {default: default_value}, [default]
  if len(exact) > 1 or (exact and bounds):
    raise ValueError(
      f"{where} takes exactly one of target_entropy= (nats) and target_fraction= (a fraction of "
      f"log(n_valid)), or bounds without an exact target; got {sorted(named)}"
    )
  for name, value in named.items():
    check_value(name, value)
  if exact:
    (name,) = exact
    return named[name], Spec((name,), (_is_fraction(name),))
  floors = [n for n in bounds if n.startswith("min")]
  ceilings = [n for n in bounds if n.startswith("max")]
  if len(floors) > 1 or len(ceilings) > 1:
    raise ValueError(
      f"{where} takes at most one floor (min_entropy= or min_fraction=) and one ceiling "
      f"(max_entropy= or max_fraction=); got {sorted(named)}"
    )
  lo_name = floors[0] if floors else "min_entropy"
  hi_name = ceilings[0] if ceilings else "max_entropy"
  lo = named.get(lo_name, 0.0)
  hi = named.get(hi_name, math.inf)
  if _is_fraction(lo_name) == _is_fraction(hi_name):
    lo_v, hi_v = concrete(lo), concrete(hi)
    if lo_v is not None and hi_v is not None and np.any(lo_v > hi_v):
      raise ValueError(f"{where}: {lo_name}={lo} lies above {hi_name}={hi}")
  spec = Spec((lo_name, hi_name), (_is_fraction(lo_name), _is_fraction(hi_name)))
  return (lo, hi), spec


def per_row(value, spec: Spec, batch: tuple[int, ...], dtype, *, heads: int | None = None):
  """The target as per-row values: ``batch`` for an exact target, ``batch + (2,)`` for bounds.

  Each value is a scalar or broadcasts to ``batch``; with ``heads``, a 1-D value of length
  ``heads`` is one value per head (``batch`` then ends in ``[heads, q_len]``).

  Raises:
    ValueError: for a value whose shape does not broadcast to ``batch`` (every shape).
  """
  values = value if spec.bounded else (value,)
  out = []
  for name, v in zip(spec.names, values, strict=True):
    v = jnp.asarray(v)
    shape = v.shape
    if heads is not None and v.ndim == 1:
      if v.shape[0] not in (1, heads):
        raise ValueError(
          f"a 1-D {name} holds one value per head: it needs {heads} values, got shape {v.shape}"
        )
      v = v[:, None]
    if not broadcasts(v.shape, batch):
      raise ValueError(
        f"{name} of shape {shape} does not broadcast to the batch shape {tuple(batch)} "
        "(the logits' shape without the normalized axis)"
      )
    out.append(jnp.broadcast_to(v.astype(dtype), batch))
  return jnp.stack(out, axis=-1) if spec.bounded else out[0]
