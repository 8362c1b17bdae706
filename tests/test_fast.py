"""capsjax.fast against the textbook functions it replaces: the same values and gradients at float32 tolerance."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax import lax

from capsjax import fast, ops
from capsjax.fast import conv
from reference import np_conv_valid

RNG = np.random.default_rng(2)


def assert_same_values_and_gradients(fast_fn, textbook_fn, args, cotangent, rtol=1e-5, atol=1e-5):
    """``fast_fn(*args) == textbook_fn(*args)``, and so are the gradients of ``sum(sin(f(*args)) * cotangent)``."""
    np.testing.assert_allclose(fast_fn(*args), textbook_fn(*args), rtol=rtol, atol=atol)
    argnums = tuple(range(len(args)))

    def grad(fn):
        return jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a)) * cotangent), argnums=argnums)(*args)

    for got, expected in zip(grad(fast_fn), grad(textbook_fn)):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


# --- u_hat and routing -------------------------------------------------------------------------------------------------


def test_parent_major_predictions_equal_capsule_predictions():
    weights = jnp.asarray(RNG.normal(size=(7, 3, 4, 5)), jnp.float32)
    u = jnp.asarray(RNG.normal(size=(2, 7, 5)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(2, 3, 7, 4)), jnp.float32)
    textbook = lambda w, x: jnp.swapaxes(ops.capsule_predictions(w, x), 1, 2)  # noqa: E731
    assert_same_values_and_gradients(fast.parent_major_predictions, textbook, (weights, u), t)
    jitted = jax.jit(jax.grad(lambda w, x: jnp.sum(fast.parent_major_predictions(w, x) * t)))(weights, u)
    np.testing.assert_allclose(jitted, jax.grad(lambda w, x: jnp.sum(textbook(w, x) * t))(weights, u), rtol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 7, 5\]"):
        fast.parent_major_predictions(weights, jnp.zeros((2, 7, 4)))


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("stop_gradient", [False, True])
@pytest.mark.parametrize("use_bias", [False, True])
def test_parent_major_routing_equals_dynamic_routing(iterations, stop_gradient, use_bias):
    u_hat = jnp.asarray(RNG.normal(size=(3, 24, 5, 6)) * 0.5, jnp.float32)  # [B, n_in, n_out, d]
    bias = jnp.asarray(RNG.normal(size=(5, 6)), jnp.float32) if use_bias else None
    t = jnp.asarray(RNG.normal(size=(3, 5, 6)), jnp.float32)
    options = dict(stop_gradient=stop_gradient, bias=bias)

    def textbook(u):
        return ops.dynamic_routing(u, iterations, **options)

    def parent_major(u):
        return fast.parent_major_routing(jnp.swapaxes(u, -3, -2), iterations, **options)

    assert_same_values_and_gradients(parent_major, textbook, (u_hat,), t)
    _, c = fast.parent_major_routing(jnp.swapaxes(u_hat, 1, 2), iterations, return_coupling=True, **options)
    _, c_ref = ops.dynamic_routing(u_hat, iterations, return_coupling=True, **options)
    assert c.shape == c_ref.shape == (3, 24, 5)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.bfloat16])
def test_parent_major_routing_other_dtypes_and_leading_axes(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        u_hat = jnp.asarray(RNG.normal(size=(2, 2, 10, 4, 6)) * 0.5).astype(dtype)
        v = fast.parent_major_routing(jnp.swapaxes(u_hat, -3, -2))
        assert v.dtype == dtype and v.shape == (2, 2, 4, 6)
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-12
        v_ref = ops.dynamic_routing(u_hat)
        np.testing.assert_allclose(np.asarray(v, np.float64), np.asarray(v_ref, np.float64), rtol=tol, atol=tol)


# --- convolution -------------------------------------------------------------------------------------------------------


def xla_conv(x, k, stride):
    return lax.conv_general_dilated(x, k, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("channels", [3, 16])  # sliced and gathered patches
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv2d_matches_numpy(stride, channels):
    x = RNG.normal(size=(2, 13, 11, channels)).astype(np.float32)
    k = RNG.normal(size=(4, 5, channels, 6)).astype(np.float32)
    np.testing.assert_allclose(fast.conv2d(x, k, stride), np_conv_valid(x, k, stride), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "channels, stride, height",
    [(8, 2, 20), (32, 2, 20), (32, 1, 13), (32, 3, 19)],  # one patch matrix; the kernel-row loop (odd heights too)
)
def test_conv2d_equals_xla_convolution(channels, stride, height):
    x = jnp.asarray(RNG.normal(size=(3, height, 17, channels)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(9, 5, channels, 16)) * 0.1, jnp.float32)
    oh, ow = (height - 9) // stride + 1, (17 - 5) // stride + 1
    t = jnp.asarray(RNG.normal(size=(3, oh, ow, 16)), jnp.float32)
    # The kernel gradients reach ~10 as sums of over 2,000 float32 products, so the two summation orders differ by up
    # to ~1e-5 of the largest value (1.2e-4 was seen): the absolute tolerance follows that scale.
    assert_same_values_and_gradients(
        lambda x, k: fast.conv2d(x, k, stride), lambda x, k: xla_conv(x, k, stride), (x, k), t, rtol=1e-4, atol=3e-4
    )
    with pytest.raises(ValueError, match="expects input"):
        fast.conv2d(jnp.zeros((1, 9, 9, 2)), jnp.zeros((3, 3, 1, 4)))


def test_many_channel_conv_gradient_never_holds_the_whole_patch_matrix():
    # With 64 input channels the matmul form loops over kernel rows; forward and backward together must need less
    # scratch memory than the [B*oh*ow, kh*kw*C] patch matrix alone (the one-matrix form needs about twice that).
    x, k = jnp.zeros((8, 20, 20, 64)), jnp.zeros((9, 9, 64, 32))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(fast.conv2d(x, k, 2) ** 2), argnums=(0, 1)))
    scratch = grad.lower(x, k).compile().memory_analysis().temp_size_in_bytes
    patch_matrix = 8 * 6 * 6 * 9 * 9 * 64 * 4
    assert scratch < patch_matrix / 2


def test_gathered_patches_equal_sliced_patches_and_gradients():
    x = jnp.asarray(RNG.normal(size=(2, 20, 17, 16)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(2, 6, 5, 81 * 16)), jnp.float32)
    gathered = jax.jit(conv.extract_patches, static_argnums=(1, 2))
    np.testing.assert_array_equal(gathered(x, (9, 9), 2), conv._sliced_patches(x, (9, 9), 2))
    assert_same_values_and_gradients(
        lambda x: gathered(x, (9, 9), 2), lambda x: conv._sliced_patches(x, (9, 9), 2), (x,), t
    )
