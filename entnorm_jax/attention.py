"""Entropy-normalized attention for long sequences.

Each query row attends with ``P = softmax(γ* s)``, ``s = scale · q·k`` over its valid keys, where
the per-row inverse temperature γ* sets the entropy of P to a target:

    o_i = Σ_j P_ij v_j,      H(P_i) = H_target  (``target_entropy`` in nats, or
                                                ``target_fraction`` f: H_target = f · log n_i),

or, with entropy bounds (``min_entropy`` / ``max_entropy``, ``min_fraction`` / ``max_fraction``),
``P_i = softmax(s_i)`` for rows whose entropy already lies inside them and the bound crossed as
the target for the others.

Three implementations share these semantics:

* ``"xla"``: the dense reference (materializes the ``[batch, heads, q_len, kv_len]`` scores);
* ``"blockwise"``: pure JAX over query and key blocks, memory linear in the sequence length;
* ``"pallas"``: ``jax.experimental.pallas`` kernels of the same blockwise algorithm (GPU through
  Triton; ``interpret=True`` runs them anywhere).

The blockwise and Pallas versions have a flash-attention-style backward pass that recomputes
score blocks and uses the implicit derivative of γ*. :func:`context_parallel_attention` splits the
keys and values along the sequence over a mesh axis and gives every row the γ* of the whole
sequence.

>>> from entnorm_jax import attention as ena
>>> # out = ena.entropy_attention(q, k, v, target_fraction=0.5, is_causal=True)
>>> # out = ena.context_parallel_attention(q, k, v, mesh=mesh, axis_name="seq", target_fraction=0.5)
"""

from entnorm_jax._src.attention import context_parallel_attention as context_parallel_attention
from entnorm_jax._src.attention import entropy_attention as entropy_attention

__all__ = ["context_parallel_attention", "entropy_attention"]
