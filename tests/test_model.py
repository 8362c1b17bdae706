"""The convolutions, the Flax layers and the CapsNet."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import capsjax
from capsjax.conv import conv2d, resolve_conv_impl

RNG = np.random.default_rng(1)


def np_conv_valid(x, k, stride):
    kh, kw, _, cout = k.shape
    batch, h, w, _ = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.zeros((batch, oh, ow, cout))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
            out[:, i, j] = np.tensordot(patch, k, axes=([1, 2, 3], [0, 1, 2]))
    return out


@pytest.mark.parametrize("channels", [3, 16])  # sliced and gathered patches
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_impls_match_numpy(stride, channels):
    x = RNG.normal(size=(2, 13, 11, channels)).astype(np.float32)
    k = RNG.normal(size=(4, 5, channels, 6)).astype(np.float32)
    ref = np_conv_valid(x, k, stride)
    for impl in ("matmul", "xla"):
        np.testing.assert_allclose(conv2d(x, k, stride, impl), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "channels, stride, height",
    [(8, 2, 20), (32, 2, 20), (32, 1, 13), (32, 3, 19)],  # one patch matrix; the kernel-row loop (odd heights too)
)
def test_conv_impls_have_same_gradients(channels, stride, height):
    x = jnp.asarray(RNG.normal(size=(3, height, 17, channels)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(9, 5, channels, 16)) * 0.1, jnp.float32)
    oh, ow = (height - 9) // stride + 1, (17 - 5) // stride + 1
    t = jnp.asarray(RNG.normal(size=(3, oh, ow, 16)), jnp.float32)

    def loss(x, k, impl):
        return jnp.sum(jnp.tanh(conv2d(x, k, stride, impl)) * t)

    gx_m, gk_m = jax.grad(loss, argnums=(0, 1))(x, k, "matmul")
    gx_x, gk_x = jax.grad(loss, argnums=(0, 1))(x, k, "xla")
    np.testing.assert_allclose(gx_m, gx_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gk_m, gk_x, rtol=1e-4, atol=1e-4)


def test_many_channel_conv_gradient_never_holds_the_whole_patch_matrix():
    # With 64 input channels the matmul form loops over kernel rows; forward and backward together must need less
    # scratch memory than the [B*oh*ow, kh*kw*C] patch matrix alone (the one-matrix form needs about twice that).
    x, k = jnp.zeros((8, 20, 20, 64)), jnp.zeros((9, 9, 64, 32))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(conv2d(x, k, 2, "matmul") ** 2), argnums=(0, 1)))
    scratch = grad.lower(x, k).compile().memory_analysis().temp_size_in_bytes
    patch_matrix = 8 * 6 * 6 * 9 * 9 * 64 * 4
    assert scratch < patch_matrix / 2


def test_conv_auto_resolves_per_backend_and_rejects_unknown():
    assert resolve_conv_impl("auto") == ("matmul" if jax.default_backend() == "cpu" else "xla")
    with pytest.raises(ValueError, match="conv impl"):
        resolve_conv_impl("fft")
    with pytest.raises(ValueError, match="expects input"):
        conv2d(jnp.zeros((1, 9, 9, 2)), jnp.zeros((3, 3, 1, 4)))


def test_default_model_has_paper_parameter_count():
    model = nnx.eval_shape(lambda: capsjax.CapsNet(rngs=nnx.Rngs(0)))
    assert capsjax.count_params(model) == 8_215_568
    with_bias = nnx.eval_shape(lambda: capsjax.CapsNet(capsjax.ModelConfig(routing_bias=True), rngs=nnx.Rngs(0)))
    assert capsjax.count_params(with_bias) == 8_215_568 + 160
    assert model.classes.W.shape == (1152, 10, 16, 8)
    assert capsjax.ModelConfig().num_primary_capsules == 1152


def test_routing_weights_init_std():
    model = capsjax.CapsNet(rngs=nnx.Rngs(0))
    assert abs(float(jnp.std(model.classes.W[...])) - 0.1) < 0.002
    assert abs(float(jnp.mean(model.classes.W[...]))) < 0.002


SMALL = capsjax.ModelConfig(
    image_shape=(16, 16, 1), conv1_channels=16, conv1_kernel=5, primary_maps=4, primary_dim=4, primary_kernel=5,
    class_dim=6, decoder_hidden=(32, 64),
)  # fmt: skip


def test_forward_shapes_and_ranges():
    model = capsjax.CapsNet(SMALL, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(3, 16, 16, 1)), jnp.float32)
    out = model(images, jnp.array([1, 2, 3]))
    assert SMALL.primary_grid == (4, 4) and SMALL.num_primary_capsules == 64
    assert out.capsules.shape == (3, 10, 6) and out.lengths.shape == (3, 10)
    assert out.reconstructions.shape == (3, 16, 16, 1)
    assert np.all((np.asarray(out.lengths) >= 0) & (np.asarray(out.lengths) < 1))
    assert np.all((np.asarray(out.reconstructions) >= 0) & (np.asarray(out.reconstructions) <= 1))
    np.testing.assert_allclose(out.lengths, np.linalg.norm(np.asarray(out.capsules), axis=-1), rtol=1e-5, atol=1e-4)


def test_decoder_uses_label_in_training_and_prediction_otherwise():
    model = capsjax.CapsNet(SMALL, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(4, 16, 16, 1)), jnp.float32)
    free = model(images)
    predicted = jnp.argmax(free.lengths, -1)
    np.testing.assert_allclose(model(images, predicted).reconstructions, free.reconstructions, rtol=1e-6)
    other = model(images, (predicted + 1) % 10).reconstructions
    assert not np.allclose(other, free.reconstructions)


def test_other_shapes_and_class_counts():
    config = dataclasses.replace(SMALL, image_shape=(32, 32, 3), num_classes=5, routing_iterations=2)
    model = capsjax.CapsNet(config, rngs=nnx.Rngs(0))
    out = model(jnp.zeros((2, 32, 32, 3)))
    assert out.capsules.shape == (2, 5, 6) and out.reconstructions.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match=r"expects images \[batch, 32, 32, 3\]"):
        model(jnp.zeros((2, 28, 28, 1)))
    with pytest.raises(ValueError, match="does not fit"):
        capsjax.ModelConfig(image_shape=(12, 12, 1))


def test_model_jit_equals_eager_and_conv_impls_agree():
    configs = {impl: dataclasses.replace(SMALL, conv_impl=impl) for impl in ("matmul", "xla")}
    images = jnp.asarray(RNG.uniform(size=(2, 16, 16, 1)), jnp.float32)
    labels = jnp.array([3, 7])
    outs, grads = {}, {}
    for impl, config in configs.items():
        model = capsjax.CapsNet(config, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)

        def loss(params):
            out = nnx.merge(graphdef, params)(images, labels)
            return jnp.sum(capsjax.margin_loss(out.lengths, labels)) + jnp.sum(out.reconstructions)

        eager = model(images, labels)
        jitted = nnx.jit(lambda m, x, y: m(x, y))(model, images, labels)
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        outs[impl], grads[impl] = eager, jax.grad(loss)(params)
    for a, b in zip(outs["matmul"], outs["xla"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["matmul"]), jax.tree.leaves(grads["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_bfloat16_convolutions_stay_close_to_float32():
    images = jnp.asarray(RNG.uniform(size=(2, 16, 16, 1)), jnp.float32)
    out32 = capsjax.CapsNet(SMALL, rngs=nnx.Rngs(0))(images)
    out16 = capsjax.CapsNet(dataclasses.replace(SMALL, conv_dtype="bfloat16"), rngs=nnx.Rngs(0))(images)
    assert out16.lengths.dtype == jnp.float32
    np.testing.assert_allclose(out16.lengths, out32.lengths, rtol=5e-2, atol=5e-3)


def test_gathered_patches_equal_sliced_patches_and_gradients():
    from capsjax import conv

    x = jnp.asarray(RNG.normal(size=(2, 20, 17, 16)), jnp.float32)
    t = jnp.asarray(RNG.normal(size=(2, 6, 5, 81 * 16)), jnp.float32)
    gathered = jax.jit(conv.extract_patches, static_argnums=(1, 2))
    np.testing.assert_array_equal(gathered(x, (9, 9), 2), conv._sliced_patches(x, (9, 9), 2))
    g1 = jax.grad(lambda x: jnp.sum(jnp.sin(gathered(x, (9, 9), 2)) * t))(x)
    g2 = jax.grad(lambda x: jnp.sum(jnp.sin(conv._sliced_patches(x, (9, 9), 2)) * t))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)


def test_train_step_never_tiles_the_routing_weights():
    """No buffer of the compiled default train step is as large as W repeated per example (batch x 1152x10x16x8)."""
    import re

    from capsjax.steps import OptimConfig, init_state, make_steps

    batch = 5  # 5 x W (7.4M values) exceeds every weight array, the 9x9x256x256 kernel (5.3M) included
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    graphdef, state = init_state(capsjax.ModelConfig(), OptimConfig(), seed=0, mesh=mesh)
    steps = make_steps(graphdef, OptimConfig(), mesh=mesh)
    images = jnp.zeros((batch, 28, 28, 1), jnp.uint8)
    labels = jnp.zeros((batch,), jnp.int32)
    hlo = steps.train.lower(state, images, labels).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"f32\[([\d,]*)\]", hlo)]
    w_size = 1152 * 10 * 16 * 8
    assert max(sizes) >= w_size  # W itself (and its Adam moments) are there ...
    assert max(sizes) < batch * w_size  # ... but never once per example


def test_routing_capsules_take_leading_batch_axes_and_reject_bad_shapes():
    layer = capsjax.RoutingCapsules(6, 4, 3, 5, rngs=nnx.Rngs(0))
    u = jnp.asarray(RNG.normal(size=(2, 3, 6, 4)), jnp.float32)
    v = layer(u)
    assert v.shape == (2, 3, 3, 5)
    np.testing.assert_allclose(v, jnp.stack([layer(u[i]) for i in range(2)]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"RoutingCapsules expects capsules \[B, 6, 4\]"):
        layer(jnp.zeros((2, 5, 4)))
