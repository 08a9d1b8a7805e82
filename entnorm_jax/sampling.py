"""Next-token sampling: entropy-targeted decoding and the common samplers, all pure and jit-able.

Parameters carry the names of Hugging Face's ``GenerationConfig`` and llama.cpp: ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``eta_cutoff``, ``mirostat_tau``,
``mirostat_eta``; the entropy method takes ``target_entropy`` or ``perplexity``. :func:`sample`
returns tokens for every method; Mirostat, which carries a state, has
:func:`sample_mirostat` ``-> (tokens, state)``; :func:`generate` runs any method in a ``lax.scan``.

>>> from entnorm_jax import sampling as ens
>>> # tokens = ens.sample(key, logits, method="entropy", perplexity=8.0)
>>> # tokens = ens.sample(key, logits, method="top_p", top_p=0.9, temperature=0.7)
>>> # tokens, state = ens.sample_mirostat(key, logits, state, mirostat_tau=3.0)
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
from entnorm_jax._src.sampling import sample_mirostat as sample_mirostat
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
  "sample_mirostat",
  "top_k_logits",
  "top_p_logits",
  "typical_logits",
]
