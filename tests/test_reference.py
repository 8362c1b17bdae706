"""The optimized CapsNet (patch-matmul convolutions, one batched product for u_hat, parent-major routing) against a
textbook formulation of the same network written here with plain ``lax.conv`` and ``einsum``: same loss, same
gradients, to float32 tolerance."""

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import capsjax
from capsjax.steps import LossConfig, compute_losses


def textbook_squash(s):
    n2 = jnp.sum(s**2, axis=-1, keepdims=True)
    return n2 / (1 + n2) * s / jnp.sqrt(n2 + 1e-7)


def textbook_conv(x, kernel, bias, stride):
    y = lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias[None, None, None, :]


def textbook_loss(params, images, labels, config):
    """Sabour et al.'s CapsNet and loss, step by step: routing with b = 0 and a softmax every iteration."""
    x = jax.nn.relu(textbook_conv(images, params["conv1"]["kernel"], params["conv1"]["bias"], 1))
    y = textbook_conv(x, params["primary"]["conv"]["kernel"], params["primary"]["conv"]["bias"], config.primary_stride)
    u = textbook_squash(y.reshape(y.shape[0], -1, config.primary_dim))
    u_hat = jnp.einsum("ijdk,bik->bijd", params["classes"]["W"], u)
    b = jnp.zeros(u_hat.shape[:3])
    for r in range(config.routing_iterations):
        c = jax.nn.softmax(b, axis=2)
        v = textbook_squash(jnp.einsum("bij,bijd->bjd", c, u_hat))
        if r < config.routing_iterations - 1:
            b = b + jnp.einsum("bijd,bjd->bij", u_hat, v)
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
    config = capsjax.ModelConfig(conv_impl="matmul")  # the paper's MNIST model, in the CPU-optimized form
    graphdef, state = nnx.split(capsjax.CapsNet(config, rngs=nnx.Rngs(3)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(4, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray([0, 3, 7, 9])

    def optimized_loss(state):
        model = nnx.merge(graphdef, state)
        return compute_losses(model(images, labels), images, labels, LossConfig())["loss"]

    loss, grads = jax.jit(jax.value_and_grad(optimized_loss))(state)
    grads = nnx.to_pure_dict(grads)
    textbook = jax.jit(jax.value_and_grad(textbook_loss), static_argnums=3)
    ref_loss, ref_grads = textbook(nnx.to_pure_dict(state), images, labels, config)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    for (path, g), (_, r) in zip(flat, ref_flat):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, path
        np.testing.assert_allclose(g, r, rtol=0, atol=2e-4 * scale, err_msg=jax.tree_util.keystr(path))
