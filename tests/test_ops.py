"""The textbook capsule maths (capsjax.ops) against NumPy references, hand values and numerical gradients."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.test_util import check_grads

import capsjax
from capsjax import ops
from reference import np_margin, np_routing, np_squash

RNG = np.random.default_rng(0)


# --- values ------------------------------------------------------------------------------------------------------------


def test_safe_norm_matches_numpy():
    s = RNG.normal(size=(5, 7, 16)).astype(np.float32)
    np.testing.assert_allclose(capsjax.safe_norm(s), np.sqrt((s**2).sum(-1) + 1e-7), rtol=1e-6)
    np.testing.assert_allclose(
        capsjax.safe_norm(s, axis=1, keepdims=True), np.sqrt((s**2).sum(1, keepdims=True) + 1e-7), rtol=1e-6
    )


def test_squash_matches_numpy_and_hand_value():
    s = RNG.normal(size=(4, 10, 16)).astype(np.float32) * 3
    np.testing.assert_allclose(capsjax.squash(s), np_squash(s), rtol=1e-5, atol=1e-6)
    # |(3, 4)| = 5: length 25/26, direction kept.
    np.testing.assert_allclose(capsjax.squash(jnp.array([3.0, 4.0])), np.array([3, 4]) / 5 * 25 / 26, rtol=1e-6)
    assert np.all(np.asarray(capsjax.squash(jnp.zeros((3, 8)))) == 0)
    # squash along another axis is squash of the transposed array
    np.testing.assert_allclose(capsjax.squash(s, axis=1), np.swapaxes(np_squash(np.swapaxes(s, 1, 2)), 1, 2), rtol=1e-5)


@pytest.mark.parametrize("iterations", [1, 2, 3, 5])
def test_routing_matches_numpy_loop(iterations):
    u_hat = (RNG.normal(size=(3, 12, 4, 6)) * 0.5).astype(np.float32)
    v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), iterations, return_coupling=True)
    v_ref, c_ref = np_routing(u_hat, iterations)
    assert v.shape == (3, 4, 6) and c.shape == (3, 12, 4)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)


def test_one_iteration_is_uniform_coupling():
    u_hat = RNG.normal(size=(2, 9, 5, 4)).astype(np.float32)
    v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 1, return_coupling=True)
    np.testing.assert_allclose(c, np.full((2, 9, 5), 0.2), rtol=1e-6)
    np.testing.assert_allclose(v, np_squash(u_hat.mean(1) * 9 / 5), rtol=1e-5, atol=1e-6)


def test_coupling_sums_to_one_over_parents_and_agreement_moves_it():
    u_hat = RNG.normal(size=(2, 30, 10, 16)).astype(np.float32)
    _, c = capsjax.dynamic_routing(jnp.asarray(u_hat), 3, return_coupling=True)
    np.testing.assert_allclose(np.asarray(c).sum(-1), 1.0, rtol=1e-6)
    assert np.asarray(c).std() > 1e-3  # not uniform after agreement steps
    # the axis is the parents': uniform over children would make c.sum(-2) == 1 instead
    assert not np.allclose(np.asarray(c).sum(-2), 1.0)


def test_routing_leading_batch_axes_and_vmap():
    u_hat = RNG.normal(size=(2, 3, 8, 4, 5)).astype(np.float32)
    v = capsjax.dynamic_routing(jnp.asarray(u_hat))
    v_vmap = jax.vmap(capsjax.dynamic_routing)(jnp.asarray(u_hat))
    v_ref, _ = np_routing(u_hat.reshape(6, 8, 4, 5), 3)
    np.testing.assert_allclose(v, v_ref.reshape(2, 3, 4, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v_vmap, v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_bias_is_added_before_squash(iterations):
    u_hat = RNG.normal(size=(2, 6, 3, 4)).astype(np.float32)
    bias = RNG.normal(size=(3, 4)).astype(np.float32)
    v, c = capsjax.dynamic_routing(jnp.asarray(u_hat), iterations, return_coupling=True, bias=jnp.asarray(bias))
    v_ref, c_ref = np_routing(u_hat, iterations, bias=bias)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, c_ref, rtol=1e-5, atol=1e-6)


def test_margin_loss_matches_numpy_and_hand_value():
    lengths = RNG.uniform(size=(6, 10)).astype(np.float32)
    labels = RNG.integers(0, 10, 6)
    np.testing.assert_allclose(capsjax.margin_loss(lengths, labels), np_margin(lengths, labels), rtol=1e-6)
    # one example, 2 classes: label 0 with length 0.5 -> 0.4^2; class 1 with length 0.3 -> 0.5 * 0.2^2
    np.testing.assert_allclose(capsjax.margin_loss(jnp.array([[0.5, 0.3]]), jnp.array([0])), [0.16 + 0.02], rtol=1e-6)
    # k-hot targets give the same loss as ids for one-hot, and count both digits for two-hot
    np.testing.assert_allclose(
        capsjax.margin_loss(lengths, jax.nn.one_hot(labels, 10)), np_margin(lengths, labels), rtol=1e-6
    )
    two_hot = np.zeros((1, 3))
    two_hot[0, [0, 2]] = 1
    np.testing.assert_allclose(capsjax.margin_loss(jnp.array([[0.5, 0.3, 1.0]]), two_hot), [0.16 + 0.02], rtol=1e-6)


def test_reconstruction_loss_sum_and_mean():
    images = RNG.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    recon = RNG.uniform(size=(4, 784)).astype(np.float32)
    sse = ((images.reshape(4, -1) - recon) ** 2).sum(-1)
    np.testing.assert_allclose(capsjax.reconstruction_loss(images, recon), sse, rtol=1e-5)
    np.testing.assert_allclose(capsjax.reconstruction_loss(images, recon, "mean"), sse / 784, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        capsjax.reconstruction_loss(images, recon, "max")
    with pytest.raises(ValueError, match="do not match"):
        capsjax.reconstruction_loss(images, recon[:, :100])


def test_mask_capsules_by_label_and_by_length():
    caps = RNG.normal(size=(3, 5, 4)).astype(np.float32)
    labels = np.array([4, 0, 2])
    masked = np.asarray(capsjax.mask_capsules(jnp.asarray(caps), jnp.asarray(labels)))
    expected = np.zeros_like(caps)
    expected[np.arange(3), labels] = caps[np.arange(3), labels]
    np.testing.assert_array_equal(masked, expected)
    longest = np.linalg.norm(caps, axis=-1).argmax(-1)
    masked = np.asarray(capsjax.mask_capsules(jnp.asarray(caps)))
    expected = np.zeros_like(caps)
    expected[np.arange(3), longest] = caps[np.arange(3), longest]
    np.testing.assert_array_equal(masked, expected)
    # k-hot targets keep several capsules (two digits of a MultiMNIST image)
    two_hot = np.zeros((3, 5), np.float32)
    two_hot[:, [1, 3]] = 1
    expected = caps * two_hot[..., None]
    np.testing.assert_array_equal(capsjax.mask_capsules(jnp.asarray(caps), jnp.asarray(two_hot)), expected)
    with pytest.raises(ValueError, match="class ids"):
        capsjax.mask_capsules(jnp.asarray(caps), jnp.zeros((3, 5, 4)))


# --- gradients ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1e-12, 1e-6, 1e-3, 1.0])
def test_squash_and_safe_norm_gradients_finite_and_correct_near_zero(scale):
    with jax.enable_x64(True):
        s = jnp.asarray(RNG.normal(size=(3, 8)) * scale, jnp.float64)
        check_grads(lambda x: ops.squash(x), (s,), order=2, modes=("fwd", "rev"), eps=1e-4 if scale >= 1 else 1e-6)
        check_grads(lambda x: ops.safe_norm(x), (s,), order=2, modes=("fwd", "rev"), eps=1e-4 if scale >= 1 else 1e-6)
        grads = jax.grad(lambda x: jnp.sum(ops.squash(x)) + jnp.sum(ops.safe_norm(x)))(s)
        assert np.all(np.isfinite(np.asarray(grads)))


def test_gradient_at_exact_zero_is_finite_in_float32():
    zero = jnp.zeros((2, 16), jnp.float32)
    for fn in (ops.squash, ops.safe_norm):
        g = jax.grad(lambda x: jnp.sum(fn(x)))(zero)
        assert np.all(np.isfinite(np.asarray(g)))


def test_capsule_predictions_match_numpy_and_gradients():
    weights = RNG.normal(size=(5, 3, 4, 2))
    u = RNG.normal(size=(2, 3, 5, 2))  # two leading batch axes
    expected = np.einsum("ijdk,abik->abijd", weights, u)
    got = ops.capsule_predictions(jnp.asarray(weights, jnp.float32), jnp.asarray(u, jnp.float32))
    assert got.shape == (2, 3, 5, 3, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        args = (jnp.asarray(weights, jnp.float64), jnp.asarray(u[0], jnp.float64))
        check_grads(ops.capsule_predictions, args, order=2, modes=("fwd", "rev"), eps=1e-5)
    with pytest.raises(ValueError, match=r"\[\.\.\., 5, 2\]"):
        ops.capsule_predictions(jnp.zeros((5, 3, 4, 2)), jnp.zeros((2, 4, 2)))


def test_capsule_predictions_under_jit_vmap_and_bfloat16():
    weights = RNG.normal(size=(6, 3, 4, 5)).astype(np.float32)
    u = RNG.normal(size=(2, 6, 5)).astype(np.float32)
    expected = np.einsum("ijdk,bik->bijd", weights, u)
    w, x = jnp.asarray(weights), jnp.asarray(u)
    np.testing.assert_allclose(jax.jit(ops.capsule_predictions)(w, x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(ops.capsule_predictions, (None, 0))(w, x), expected, rtol=1e-5, atol=1e-5)
    got = ops.capsule_predictions(w.astype(jnp.bfloat16), x.astype(jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected, rtol=5e-2, atol=5e-2)


def test_routing_gradients_match_finite_differences():
    with jax.enable_x64(True):
        u_hat = jnp.asarray(RNG.normal(size=(2, 5, 3, 4)), jnp.float64)
        check_grads(lambda u: capsjax.dynamic_routing(u, 3), (u_hat,), order=1, modes=("rev",), eps=1e-5)


def test_routing_stop_gradient_same_value_different_gradient():
    u_hat = jnp.asarray(RNG.normal(size=(2, 7, 3, 4)), jnp.float32)
    f = lambda u, sg: jnp.sum(capsjax.dynamic_routing(u, 3, stop_gradient=sg) ** 2)  # noqa: E731
    np.testing.assert_allclose(f(u_hat, True), f(u_hat, False), rtol=1e-6)
    g_full, g_stop = jax.grad(f)(u_hat, False), jax.grad(f)(u_hat, True)
    assert np.all(np.isfinite(np.asarray(g_stop)))
    assert not np.allclose(g_full, g_stop, rtol=1e-3)


# --- transformations and dtypes ----------------------------------------------------------------------------------------


def test_jit_equals_no_jit():
    u_hat = jnp.asarray(RNG.normal(size=(2, 16, 10, 8)), jnp.float32)
    lengths = jnp.asarray(RNG.uniform(size=(4, 10)), jnp.float32)
    labels = jnp.asarray([1, 2, 3, 4])
    np.testing.assert_allclose(jax.jit(capsjax.dynamic_routing)(u_hat), capsjax.dynamic_routing(u_hat), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jax.jit(capsjax.squash)(u_hat), capsjax.squash(u_hat), rtol=1e-6)
    np.testing.assert_allclose(jax.jit(capsjax.margin_loss)(lengths, labels), capsjax.margin_loss(lengths, labels))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_ops_in_every_dtype(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        u_hat = jnp.asarray(RNG.normal(size=(2, 10, 4, 6)) * 0.5).astype(dtype)
        v = capsjax.dynamic_routing(u_hat)
        assert v.dtype == dtype
        v_ref, _ = np_routing(np.asarray(u_hat.astype(jnp.float32)), 3)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
        np.testing.assert_allclose(np.asarray(v.astype(jnp.float32)), v_ref, rtol=tol, atol=tol)
        assert capsjax.squash(u_hat).dtype == dtype
        assert capsjax.safe_norm(u_hat).dtype == dtype
        grad = jax.grad(lambda u: jnp.sum(capsjax.dynamic_routing(u).astype(jnp.float32)))(u_hat)
        assert grad.dtype == dtype and np.all(np.isfinite(np.asarray(grad.astype(jnp.float32))))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_iterations"):
        capsjax.dynamic_routing(jnp.zeros((2, 3, 4)), 0)
    with pytest.raises(ValueError, match="n_in, n_out, d"):
        capsjax.dynamic_routing(jnp.zeros((3, 4)))


def test_bad_inputs_to_the_pure_functions_are_clear_errors():
    # each of these gave a silently wrong value (integer maths, out-of-range ids as "absent", [B, 1] ids read as
    # k-hot targets, uint8 images compared with [0, 1] reconstructions) or an error from deep inside JAX
    lengths = jnp.full((3, 10), 0.5)
    with pytest.raises(TypeError, match="squash's input must be floating point"):
        ops.squash(jnp.array([[3, 4, 0]]))
    with pytest.raises(TypeError, match="safe_norm's input must be floating point"):
        ops.safe_norm(jnp.array([[1j, 0, 0]]))
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        ops.squash(jnp.ones((2, 3)), epsilon=-1.0)
    np.testing.assert_allclose(ops.safe_norm(jnp.array([3.0, 4.0]), epsilon=0.0), 5.0)  # an exact norm: allowed
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 10\), got values in \[-1, 99\]"):
        ops.margin_loss(lengths, jnp.array([10, -1, 99]))
    with pytest.raises(TypeError, match="class ids must be integers, got float32"):
        ops.margin_loss(lengths, jnp.array([3.7, 1.2, 0.0]))
    with pytest.raises(ValueError, match=r"labels \(3, 1\) must be class ids \(3,\) or k-hot targets \(3, 10\)"):
        ops.margin_loss(lengths, jnp.array([[1], [2], [3]]))
    with pytest.raises(ValueError, match=r"labels \(4,\) must be class ids \(3,\)"):
        ops.mask_capsules(jnp.ones((3, 10, 16)), jnp.array([1, 2, 3, 4]))
    with pytest.raises(TypeError, match="images must be float in \\[0, 1\\], got uint8: divide uint8 images by 255"):
        ops.reconstruction_loss(jnp.zeros((2, 28, 28, 1), jnp.uint8), jnp.zeros((2, 784)))
    u_hat = jnp.ones((2, 5, 3, 4))
    with pytest.raises(TypeError, match="num_iterations must be a Python int, got float"):
        ops.dynamic_routing(u_hat, 3.0)
    with pytest.raises(TypeError, match="mark it static"):
        jax.jit(ops.dynamic_routing)(u_hat, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \[n_out, d\] = \[3, 4\], got \[4, 3\]"):
        ops.dynamic_routing(u_hat, bias=jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="u_hat must be floating point"):
        ops.dynamic_routing(u_hat.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"weights must have shape \[n_in, n_out, d_out, d_in\]"):
        ops.capsule_predictions(jnp.ones((5, 3, 4)), jnp.ones((2, 5, 4)))
    # what stays valid: lists, k-hot targets, ids under jit (not checked there), an empty batch
    np.testing.assert_allclose(ops.margin_loss(lengths, [1, 2, 3]), ops.margin_loss(lengths, jnp.eye(10)[1:4]))
    assert jax.jit(ops.margin_loss)(lengths, jnp.array([1, 2, 3])).shape == (3,)
    assert ops.reconstruction_loss(jnp.zeros((0, 28, 28, 1)), jnp.zeros((0, 784))).shape == (0,)


def test_models_refuse_integer_images_and_bad_sizes():
    from flax import nnx

    config = capsjax.ModelConfig(conv1_channels=8, primary_maps=2, decoder_hidden=(8,))
    model = capsjax.build_model(config, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="CapsNet expects float images in \\[0, 1\\], got uint8: divide uint8 images"):
        model(jnp.zeros((1, 28, 28, 1), jnp.uint8))
    assert model(jnp.zeros((0, 28, 28, 1))).lengths.shape == (0, 10)  # an empty batch
    for fields, message in (({"class_dim": 0}, "class_dim must be an int >= 1, got 0"),
                            ({"routing_iterations": 2.5}, "routing_iterations must be an int >= 1, got 2.5"),
                            ({"decoder_hidden": (-4,)}, r"decoder_hidden must hold ints >= 1, got \(-4,\)")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            capsjax.ModelConfig(**fields)
