"""The implementation of entnorm_jax; a map for a newcomer (the public modules re-export from here).

Who calls whom, top to bottom (a module imports only modules below it):

* the public modules: ``entnorm_jax`` (its ``__init__``), ``entnorm_jax.attention``,
  ``entnorm_jax.sampling``, ``entnorm_jax.linen`` and ``entnorm_jax.nnx``, which re-export;
* ``flax_attention``: what the Flax modules share (targets as parameters, the decode cache, the
  keywords passed to ``attention_fn``);
* ``attention``: the public attention functions: checks, the engine per ``implementation``,
  context parallelism;
* ``sampling``, ``affinities``, ``dense_attention``: built on the core's public functions;
* ``pallas_attention`` over ``blockwise_attention``: the attention engines without the N×N
  matrix (Triton kernels; key blocks in plain JAX);
* ``functions``: the public normalization functions (axis, mask, units of the target, dtypes),
  over ``normalize``: the core solve, laid out per platform, and its implicit derivative
  (``custom_jvp``), which runs ``pallas_core``'s fused kernel on GPUs;
* the per-block solve: ``iteration`` over ``first_guess`` over ``bounds`` over ``moments``;
* at the bottom, importing nothing of ours but each other: ``targets`` (the target keywords) over
  ``inputs`` (input checks, dtypes), ``attention_common`` (pieces of the attention engines),
  ``backends`` (workarounds, each for one compiler), ``pallas_core``.

``hooks`` is the benchmarks' one door into these internals.

The per-block solve, shared by every layout and every attention engine:

1. **Statistics** (:func:`moments.shifted`, :func:`moments.row_stats`): the rows shifted to
   maximum 0 and one exponential-free pass: valid count, ties at the maximum, gap to the next
   value, mean and variance.
2. **Bounds and goal** (:mod:`bounds`): the reachable range [log m, log n], the tolerance, and
   what each row is solved for (an exact target, or the floor/ceiling it crosses; rows inside
   their bounds are held at γ = 1). Rows whose values lie closer together than float's range
   can multiply are then rescaled by a power of two chosen for their target
   (:func:`normalize._rescale_tiny_rows`, a ``cond`` that costs one comparison when no row needs
   it).
3. **First guess** (:mod:`first_guess`): γ from a model of the row. *Edge rows* enter here: a
   target at log n (or an empty row) gets γ = 0, one at log m the argmax bound, a NaN row or target
   NaN; they are ``fixed`` and never stepped.
4. **Iteration** (:func:`iteration.solve`): a ``while_loop`` whose every pass is one *evaluation*
   (:func:`moments.evaluate`, one exponential per entry). A *full* evaluation gives the entropy
   and its first two derivatives (sums S_0..S_3) and anchors a third-order step; a *light* one
   gives the entropy alone (S_0, S_1) and is used to confirm a row already within a few
   hundredths of a nat. A block of rows stops when all its rows are within the tolerance.
5. **Derivative** (:func:`normalize._tangents`): the implicit function theorem, written from the
   solution (q, γ*) alone, never through the loop.

Which layout runs where (:func:`normalize._layout`; ``implementation=``):

* ``"tiled"``, the CPU default: blocks of about 2 MiB of rows, one after another; rows of up to
  1024 entries held in the lanes layout (:func:`moments.lane_shape`), where every evaluation is a
  full one (one variadic reduction) and anchors its own step;
* ``"xla"``, the TPU default: whole-array passes;
* ``"pallas"``, the CUDA default: :mod:`pallas_core`'s fused kernel (Triton on GPUs, Mosaic on TPUs
  when asked, interpreted on CPUs).

Attention has engines of its own, named by the same ``implementation=`` keyword: ``"xla"`` (the
dense reference, :mod:`dense_attention`, which calls the core), ``"blockwise"`` (key blocks, no
N×N matrix) and ``"pallas"`` (its Triton kernels); the last two drive :func:`iteration.solve`
with moments accumulated over key blocks (:func:`blockwise_attention.solve_attention_rows`).
"""
