"""Next-token sampling: entropy-targeted decoding and the common samplers, all pure and jit-able.

>>> from entnorm_jax import sampling as ens
>>> # tokens = ens.sample(key, logits, method="entropy", perplexity=8.0)
"""

from entnorm_jax._src.sampling import Generation as Generation
from entnorm_jax._src.sampling import MirostatState as MirostatState
from entnorm_jax._src.sampling import entropy_logits as entropy_logits
from entnorm_jax._src.sampling import eta_logits as eta_logits
from entnorm_jax._src.sampling import generate as generate
from entnorm_jax._src.sampling import min_p_logits as min_p_logits
from entnorm_jax._src.sampling import mirostat_init as mirostat_init
from entnorm_jax._src.sampling import process_logits as process_logits
from entnorm_jax._src.sampling import sample as sample
from entnorm_jax._src.sampling import top_k_logits as top_k_logits
from entnorm_jax._src.sampling import top_p_logits as top_p_logits
from entnorm_jax._src.sampling import typical_logits as typical_logits

__all__ = [
  "Generation",
  "MirostatState",
  "entropy_logits",
  "eta_logits",
  "generate",
  "min_p_logits",
  "mirostat_init",
  "process_logits",
  "sample",
  "top_k_logits",
  "top_p_logits",
  "typical_logits",
]
