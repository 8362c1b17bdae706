"""The Flax layers, the CapsNet and the switch between the fast and the textbook kernels."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import capsjax
from capsjax.layers import resolve_kernels

RNG = np.random.default_rng(1)


def test_kernels_auto_resolves_per_backend_and_rejects_unknown():
    assert resolve_kernels("auto") == ("fast" if jax.default_backend() == "cpu" else "textbook")
    assert resolve_kernels("textbook") == "textbook"
    with pytest.raises(ValueError, match="kernels must be one of"):
        resolve_kernels("matmul")
    with pytest.raises(ValueError, match="kernels must be one of"):
        capsjax.ModelConfig(kernels="xla")


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
    # safe_norm's definition (epsilon 1e-7 inside the square root), which a plain norm misses by up to 3e-4 near 0
    expected = np.sqrt(np.sum(np.square(np.asarray(out.capsules, np.float64)), axis=-1) + 1e-7)
    np.testing.assert_allclose(out.lengths, expected, rtol=1e-5, atol=1e-6)


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


@pytest.mark.slow
def test_model_jit_equals_eager_and_fast_equals_textbook():
    configs = {kernels: dataclasses.replace(SMALL, kernels=kernels) for kernels in ("fast", "textbook")}
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
        outs[impl], grads[impl] = eager, jax.jit(jax.grad(loss))(params)
    for a, b in zip(outs["fast"], outs["textbook"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads["fast"]), jax.tree.leaves(grads["textbook"])):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_mixed_precision_stays_close_to_float32():
    images = jnp.asarray(RNG.uniform(size=(2, 16, 16, 1)), jnp.float32)
    out32 = capsjax.CapsNet(SMALL, rngs=nnx.Rngs(0))(images)
    out16 = capsjax.CapsNet(dataclasses.replace(SMALL, precision="mixed"), rngs=nnx.Rngs(0))(images)
    assert out16.lengths.dtype == jnp.float32
    np.testing.assert_allclose(out16.lengths, out32.lengths, rtol=5e-2, atol=5e-3)


def test_train_step_never_tiles_the_routing_weights():
    """No buffer of the compiled default train step is as large as W repeated per example (batch x 1152x10x16x8)."""
    import re

    from capsjax.config import OptimConfig
    from capsjax.steps import init_state, make_steps

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


@pytest.mark.parametrize("kernels", ["fast", "textbook"])
def test_routing_capsules_take_leading_batch_axes_and_reject_bad_shapes(kernels):
    layer = capsjax.RoutingCapsules(6, 4, 3, 5, use_bias=True, kernels=kernels, rngs=nnx.Rngs(0))
    u = jnp.asarray(RNG.normal(size=(2, 3, 6, 4)), jnp.float32)
    v, c = layer(u, return_coupling=True)
    assert v.shape == (2, 3, 3, 5) and c.shape == (2, 3, 6, 3)
    np.testing.assert_allclose(v, jnp.stack([layer(u[i]) for i in range(2)]), rtol=1e-5, atol=1e-6)
    textbook = capsjax.dynamic_routing(layer.predictions(u), bias=layer.bias[...])
    np.testing.assert_allclose(v, textbook, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"RoutingCapsules expects capsules \[B, 6, 4\]"):
        layer(jnp.zeros((2, 5, 4)))


def test_module_api_misuse_is_a_clear_error():
    # each was a wrong result without a word or an error from deep inside JAX
    from capsjax.layers import Conv2D, Decoder

    two = capsjax.ModelConfig(conv1_channels=8, primary_maps=2, primary_dim=4, class_dim=4, decoder_hidden=(8, 16),
                              num_targets=2)  # fmt: skip
    model, images = capsjax.CapsNet(two, rngs=nnx.Rngs(0)), jnp.full((2, 28, 28, 1), 0.5)
    for ids in (jnp.array([7, 3]), jnp.array([[1, 5], [2, 7]])):  # were read as scores: classes {0, 1} decoded
        with pytest.raises(ValueError, match=r"num_targets=2, labels must be k-hot \[B, num_classes\]"):
            model(images, ids)
    k_hot = jax.nn.one_hot(jnp.array([[1, 5], [2, 7]]), 10).sum(axis=-2)
    assert model(images, k_hot).reconstructions.shape == (2, 2, 28, 28, 1)
    for fields, message in (
        ({"routing_init_std": float("nan")}, "routing_init_std must be a finite number >= 0"),  # all outputs NaN
        ({"routing_init_std": -1.0}, "routing_init_std must be a finite number >= 0"),
        ({"use_decoder": "false"}, "use_decoder must be True or False"),  # built a decoder
        ({"routing_stop_gradient": "no"}, "routing_stop_gradient must be True or False"),
        ({"image_shape": (28.0, 28, 1)}, r"image_shape must be \(height, width, channels\), ints >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            capsjax.ModelConfig(**fields)
    assert capsjax.ModelConfig(use_decoder=np.True_).use_decoder is True  # NumPy's bool: a plain one (JSON)
    with pytest.raises(ValueError, match=r"Decoder expects masked capsules \[B, n_out, d\] with n_out \* d = 40"):
        Decoder(40, (8,), (28, 28, 1), rngs=nnx.Rngs(0))(jnp.ones((2, 10, 8)))
    for kernels in ("textbook", "fast"):
        with pytest.raises(ValueError, match=r"Conv2D expects inputs \[B, H, W, 1\] \(NHWC\), got \(2, 8, 8, 3\)"):
            Conv2D(1, 4, 3, kernels=kernels, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 3)))
