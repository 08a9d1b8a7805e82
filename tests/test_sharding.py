"""The Flax modules on a mesh of 8 host devices: sharded runs equal the single-device run.

Each check runs in a subprocess with ``--xla_force_host_platform_device_count=8`` (the device
count is fixed when JAX starts). Inputs are sharded over the batch, the attention heads are
sharded through Flax's partitioning metadata on the kernels, and the outputs, gradients and a
jitted optax step are compared with the same computation on one device.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import sharding_env

_PRELUDE = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "model"))
x = jax.random.normal(jax.random.key(0), (4, 12, 32))
cot = jax.random.normal(jax.random.key(1), x.shape)
x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch", None, None)))

def close(a, b, what, tol=2e-5):
  # Relative to the largest entry of the whole tree: some gradients are zero up to rounding
  # (the key bias shifts every score of a query row alike, which changes nothing).
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  scale = max(float(np.max(np.abs(np.asarray(v)))) for v in b)
  for u, v in zip(a, b, strict=True):
    err = float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) / scale
    assert err < tol, (what, err)
"""

_LINEN = """
from flax import linen as nn
from entnorm_jax import linen as enn
# Query/key/value kernels are [features, heads, head_dim]: their heads go to the "model" axis.
heads = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model", None))
# No biases: the key bias's gradient is zero up to rounding, which adam's first step (about
# lr · sign(g)) would turn into differences of 2·lr between any two runs.
module = enn.EntropyMultiHeadAttention(
  num_heads=4, qkv_features=32, target_fraction=0.5, kernel_init=heads, learn_target=True,
  use_bias=False,
)
mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
boxed = jax.jit(module.init)(jax.random.key(2), x, mask=mask)
params = nn.unbox(boxed)
specs = nn.get_partition_spec(boxed)
sharded = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
assert any(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)))

apply = jax.jit(lambda p, x: module.apply(p, x, mask=mask))
loss = lambda p, x: jnp.sum(module.apply(p, x, mask=mask) * cot)
grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
close(apply(sharded, x_sharded), apply(params, x), "output")
close(grad(sharded, x_sharded), grad(params, x), "gradients")

opt = optax.adamw(1e-2)
@jax.jit
def step(p, state, x):
  g = jax.grad(loss)(p, x)
  updates, state = opt.update(g, state, p)
  return optax.apply_updates(p, updates), state
one, _ = step(params, opt.init(params), x)
many, _ = step(sharded, opt.init(sharded), x_sharded)
close(many, one, "adamw step")
assert many["params"]["query"]["kernel"].sharding.spec == P(None, "model", None)
print("linen ok")
"""

_NNX = """
from flax import nnx
from entnorm_jax import nnx as ennx
heads = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model", None))
with jax.set_mesh(mesh):  # NNX creates the annotated variables sharded
  module = ennx.EntropyMultiHeadAttention(
    num_heads=4, in_features=32, target_fraction=0.5, kernel_init=heads, use_bias=False,
    rngs=nnx.Rngs(2), decode=False,
  )
mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
graph, sharded = nnx.split(module)
assert sharded["query"]["kernel"].value.sharding.spec == P(None, "model", None)
single = jax.device_put(sharded, jax.devices()[0])

def run(state, x):
  return nnx.merge(graph, state)(x, mask=mask)

loss = lambda state, x: jnp.sum(run(state, x) * cot)
close(jax.jit(run)(sharded, x_sharded), jax.jit(run)(single, x), "output")
grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
close(grad(sharded, x_sharded), grad(single, x), "gradients")
print("nnx ok")
"""


def _run(script: str, expect: str) -> None:
  env = sharding_env()
  code = textwrap.dedent(_PRELUDE) + textwrap.dedent(script)
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-4000:]
  assert expect in out.stdout


def test_linen_and_nnx_modules_sharded_over_batch_and_heads():
  # One subprocess for both (JAX and Flax start once); each script prints its own line.
  _run(_LINEN + _NNX, "linen ok\nnnx ok")


_CONTEXT = """
import entnorm_jax.attention as en
seq_mesh = Mesh(np.array(jax.devices()), ("seq",))
keys = jax.random.split(jax.random.key(3), 8)
q = jax.random.normal(keys[0], (2, 48, 4, 8))
k = jax.random.normal(keys[1], (2, 64, 2, 8)) * 2.0  # two query heads per key head
v = jax.random.normal(keys[2], (2, 64, 2, 8))
target = jax.random.uniform(keys[3], (2, 4, 48), minval=0.1, maxval=0.9)
d_out = jax.random.normal(keys[4], q.shape)
mask = jax.random.bernoulli(keys[5], 0.8, (2, 1, 48, 64))
lengths = dict(key_value_seq_lengths=jnp.array([64, 21]), query_seq_lengths=jnp.array([48, 30]))
cases = {
  "plain": dict(target_fraction=target),
  "causal, padded": dict(target_fraction=target, is_causal=True, **lengths),
  "mask, absolute": dict(mask=mask, target_entropy=jnp.full((2, 4, 48), 1.5)),
}
for name, kw in cases.items():
  unit = "target_fraction" if "target_fraction" in kw else "target_entropy"
  tgt = kw.pop(unit)
  # The same blockwise computation on one device is the reference (same float32 rounding); the
  # sharded one runs 8 shards of 8 keys (two key blocks of 4 each). The dense computation checks
  # the outputs too.
  one = lambda q, k, v, t: en.entropy_attention(
    q, k, v, implementation="blockwise", block_q=16, block_k=4, **kw, **{unit: t}
  )
  many = lambda q, k, v, t: en.context_parallel_attention(
    q, k, v, mesh=seq_mesh, axis_name="seq", block_q=16, block_k=4, **kw, **{unit: t}
  )
  dense = lambda q, k, v, t: en.entropy_attention(
    q, k, v, implementation="xla", **kw, **{unit: t}
  )
  assert "psum" in str(jax.make_jaxpr(many)(q, k, v, tgt))
  grad = lambda fn: jax.grad(lambda *a: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2, 3))
  # One program per case (one compile, not five): outputs and gradients of both, the dense output.
  every = jax.jit(lambda *a: (many(*a), one(*a), dense(*a), grad(many)(*a), grad(one)(*a)))
  out, out_one, out_dense, grads_many, grads_one = every(q, k, v, tgt)
  close(out, out_one, name, tol=1e-5)
  close(out, out_dense, (name, "dense"), tol=1e-5)
  for i, (a, b) in enumerate(zip(grads_many, grads_one)):
    close(a, b, (name, "d" + "qkvt"[i]), tol=2e-5)
# The README's mesh: jax.make_mesh, whose axes are Explicit by default (the inputs are resharded
# to the specs); gradients are taken inside jax.set_mesh, as explicit sharding asks.
explicit = jax.make_mesh((8,), ("seq",))
kw = dict(target_fraction=0.5, is_causal=True, block_q=16, block_k=4)
many = lambda q, k, v: en.context_parallel_attention(q, k, v, mesh=explicit, axis_name="seq", **kw)
one = jax.jit(lambda q, k, v: en.entropy_attention(q, k, v, implementation="blockwise", **kw))
close(many(q, k, v), one(q, k, v), "make_mesh", tol=1e-5)
grad = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * d_out), argnums=(0, 1, 2)))
with jax.set_mesh(explicit):
  sharded = grad(many)(q, k, v)
for i, (a, b) in enumerate(zip(sharded, grad(one)(q, k, v))):
  close(a, b, ("make_mesh", "d" + "qkv"[i]), tol=2e-5)
print("context ok")
"""


def test_context_parallel_attention_equals_one_device():
  _run(_CONTEXT, "context ok")
