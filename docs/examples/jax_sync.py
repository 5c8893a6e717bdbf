"""Synchronized batch norm under jax.shard_map: 4 CPU devices (forced by XLA_FLAGS) each hold
a quarter of the batch and a mask; statistics, running update and gradients equal those of
the whole batch's valid values.

    python docs/examples/jax_sync.py
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # before JAX starts

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import portable_bn as pbn
from portable_bn.distributed import JaxAxis

jax.config.update("jax_enable_x64", True)
mesh = Mesh(np.array(jax.devices()[:4]), ("batch",))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(3.0, 2.0, size=(16, 8, 10)))  # (N, C, L): sequences of length 10
mask = jnp.asarray(rng.random((16, 10)) < np.linspace(0.2, 0.9, 16)[:, None])  # padding differs per device
weight, bias = jnp.ones(8), jnp.zeros(8)
running_mean, running_var = jnp.zeros(8), jnp.ones(8)


def local_step(x, mask, weight, bias):
    result = pbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, mask=mask, sync=JaxAxis("batch"))
    return result.output, result.running_mean, result.running_var


sharded = jax.jit(
    jax.shard_map(local_step, mesh=mesh, in_specs=(P("batch"), P("batch"), P(), P()), out_specs=(P("batch"), P(), P()))
)
errors = []


def error(got, want):
    errors.append(float(np.abs(np.asarray(got) - np.asarray(want)).max()))
    return errors[-1]


output, new_mean, new_var = sharded(x, mask, weight, bias)
whole = pbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, mask=mask)
print("output differs from the whole batch's by", error(output, whole.output))
print("running_var differs by", error(new_var, whole.running_var))


def whole_step(x, mask, weight, bias):
    return (pbn.batch_norm(x, running_mean, running_var, weight, bias, training=True, mask=mask).output,)


def gradients(step):
    return jax.grad(lambda x, w, b: jnp.sum(jnp.sin(step(x, mask, w, b)[0])), argnums=(0, 1, 2))(x, weight, bias)


for name, got, want in zip(("x", "weight", "bias"), gradients(sharded), gradients(whole_step), strict=True):
    print(f"gradient of {name} differs by", error(got, want))


# Averaging each device's mean (what a mean over replicas of per-replica statistics does)
# weighs a device with little valid data as much as one with much:
def averaged_means(x, mask):
    valid = mask[:, None, :]
    local_mean = jnp.sum(jnp.where(valid, x, 0.0), axis=(0, 2)) / jnp.sum(valid, axis=(0, 2))
    return jax.lax.pmean(local_mean, "batch")


worst = max(errors)
averaged = jax.shard_map(averaged_means, mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P())(x, mask)
print("a mean averaged over devices instead of weighted by count is off by", error(averaged, whole.mean))
sys.exit(0 if worst < 1e-10 else 1)
