"""entnorm_jax: entropy normalization of probability distributions in JAX.

``q = softmax(γ*·z)`` with γ* chosen so that the Shannon entropy of q equals a target.
Flax modules live in ``entnorm_jax.linen`` and ``entnorm_jax.nnx`` so that this package needs
only JAX.
"""

from importlib import metadata as _metadata

from entnorm_jax._src.affinities import joint_affinities as joint_affinities
from entnorm_jax._src.affinities import perplexity_affinities as perplexity_affinities
from entnorm_jax._src.functions import entropy as entropy
from entnorm_jax._src.functions import entropy_log_softmax as entropy_log_softmax
from entnorm_jax._src.functions import entropy_normalize as entropy_normalize
from entnorm_jax._src.functions import entropy_softmax as entropy_softmax
from entnorm_jax._src.functions import (
  entropy_softmax_cross_entropy as entropy_softmax_cross_entropy,
)
from entnorm_jax._src.functions import (
  entropy_softmax_cross_entropy_with_integer_labels as entropy_softmax_cross_entropy_with_integer_labels,  # noqa: E501
)
from entnorm_jax._src.functions import solve_gamma as solve_gamma
from entnorm_jax._src.iteration import SolveInfo as SolveInfo

try:
  __version__ = _metadata.version("entnorm_jax")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
  __version__ = "0.0.0"

__all__ = [
  "SolveInfo",
  "entropy",
  "entropy_log_softmax",
  "entropy_normalize",
  "entropy_softmax",
  "entropy_softmax_cross_entropy",
  "entropy_softmax_cross_entropy_with_integer_labels",
  "joint_affinities",
  "perplexity_affinities",
  "solve_gamma",
]
