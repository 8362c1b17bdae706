"""The CPU-tuned CapsNet (``kernels="fast"``: capsjax.fast's convolutions, parent-major u_hat and routing) against the
textbook formulation of the same network written here from ``lax.conv`` and the functions of :mod:`capsjax.ops`:
same loss, same gradients, to float32 tolerance."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import capsjax
from capsjax import ops
from capsjax.steps import LossConfig, compute_losses


def textbook_conv(x, kernel, bias, stride):
    y = lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias[None, None, None, :]


def textbook_loss(params, images, labels, config):
    """Sabour et al.'s CapsNet and loss, step by step."""
    x = jax.nn.relu(textbook_conv(images, params["conv1"]["kernel"], params["conv1"]["bias"], 1))
    y = textbook_conv(x, params["primary"]["conv"]["kernel"], params["primary"]["conv"]["bias"], config.primary_stride)
    u = ops.squash(y.reshape(y.shape[0], -1, config.primary_dim))
    v = ops.dynamic_routing(ops.capsule_predictions(params["classes"]["W"], u), config.routing_iterations)
    lengths = jnp.sqrt(jnp.sum(v**2, axis=-1) + 1e-7)
    targets = jax.nn.one_hot(labels, config.num_classes)
    margin = jnp.sum(
        targets * jnp.maximum(0.0, 0.9 - lengths) ** 2 + 0.5 * (1 - targets) * jnp.maximum(0.0, lengths - 0.1) ** 2,
        axis=-1,
    )
    h = (v * targets[..., None]).reshape(v.shape[0], -1)
    for layer in params["decoder"]["hidden"].values():
        h = jax.nn.relu(h @ layer["kernel"] + layer["bias"][None, :])
    recon = jax.nn.sigmoid(h @ params["decoder"]["out"]["kernel"] + params["decoder"]["out"]["bias"][None, :])
    recon_loss = jnp.sum((images.reshape(images.shape[0], -1) - recon) ** 2, axis=-1)
    return jnp.mean(margin + 0.0005 * recon_loss)


def test_optimized_model_equals_textbook_formulation():
    config = capsjax.ModelConfig(kernels="fast")  # the paper's MNIST model, in the CPU-tuned form
    graphdef, state = nnx.split(capsjax.CapsNet(config, rngs=nnx.Rngs(3)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray([0, 3, 7, 9])

    def optimized_loss(state):
        model = nnx.merge(graphdef, state)
        return compute_losses(model, model(images, labels), images, labels, LossConfig())["loss"]

    # XLA's optimised CPU code for these two (conftest.py turns it off for the tests' small programs): the full model
    # runs three times slower without it
    optimized = {"xla_backend_optimization_level": 2}
    loss, grads = jax.jit(jax.value_and_grad(optimized_loss), compiler_options=optimized)(state)
    grads = nnx.to_pure_dict(grads)
    textbook = jax.jit(jax.value_and_grad(textbook_loss), static_argnums=3, compiler_options=optimized)
    ref_loss, ref_grads = textbook(nnx.to_pure_dict(state), images, labels, config)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    for (path, g), (_, r) in zip(flat, ref_flat):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, path
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-4 * scale, err_msg=jax.tree_util.keystr(path))
