"""Efficient-CapsNet (capsjax.efficient_capsnet): parameter count, layers against references, Batch Normalization's
two modes and its statistics in the train state, the preset and its schedule."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import capsjax
from capsjax import routing
from capsjax.config import ModelConfig, OptimConfig, get_config
from capsjax.efficient_capsnet import DepthwisePrimaryCapsules, EfficientCapsNet
from capsjax.steps import init_state, make_schedule, make_steps

RNG = np.random.default_rng(21)
EFFICIENT = ModelConfig(arch="efficient_capsnet")
TINY = dataclasses.replace(EFFICIENT, image_shape=(12, 12, 1), effcaps_stem_channels=(4, 8), effcaps_stem_kernels=(3, 3),
                           effcaps_stem_strides=(1, 2), primary_dim=4, class_dim=6, decoder_hidden=(16,))  # fmt: skip


def test_parameter_count_is_the_papers():
    """161,824 trainable parameters and 576 running statistics (about 162k); the decoder adds 1,411,344."""
    model = nnx.eval_shape(lambda: capsjax.build_model(EFFICIENT, rngs=nnx.Rngs(0)))
    assert isinstance(model, EfficientCapsNet)
    stem = (5 * 5 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (3 * 3 * 64 * 64 + 64) + (3 * 3 * 64 * 128 + 128)
    norm = 2 * (32 + 64 + 64 + 128)
    primary = 9 * 9 * 128 + 128
    classes = 16 * 10 * 16 * 8 + 16 * 10  # W and the log priors
    decoder = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)
    assert capsjax.count_params(model) == stem + norm + primary + classes + decoder
    assert capsjax.count_params(model) - decoder == 161_824 and decoder == 1_411_344
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat))) == 576
    assert model.primary.kernel.shape == (9, 9, 128) and model.classes.W.shape == (16, 10, 16, 8)
    bare = nnx.eval_shape(lambda: capsjax.build_model(dataclasses.replace(EFFICIENT, use_decoder=False),
                                                      rngs=nnx.Rngs(0)))  # fmt: skip
    assert capsjax.count_params(bare) == 161_824


def test_depthwise_primary_capsules_are_a_valid_depthwise_convolution():
    layer = DepthwisePrimaryCapsules(5, 4, 6, 3, rngs=nnx.Rngs(0))
    layer.bias = nnx.Param(jnp.asarray(RNG.normal(size=6), jnp.float32))
    x = jnp.asarray(RNG.normal(size=(2, 5, 4, 6)), jnp.float32)
    kernel = layer.kernel[...][:, :, None, :]  # HWIO with one input channel per group
    conv = lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=6)  # fmt: skip
    expected = routing.exp_squash((conv[:, 0, 0] + layer.bias[...][None]).reshape(2, 2, 3))
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="do not divide"):
        DepthwisePrimaryCapsules(5, 4, 6, 4, rngs=nnx.Rngs(0))


def test_forward_follows_the_contract_and_routes_by_self_attention():
    model = capsjax.build_model(TINY, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(3, 12, 12, 1)), jnp.float32)
    labels = jnp.asarray([1, 2, 3])
    out, labelled = nnx.jit(lambda m, x, y: (m(x), m(x, y)))(model, images, labels)
    assert out.capsules.shape == (3, 10, 6) and out.lengths.shape == (3, 10) and out.reconstructions.shape == (3, 12, 12, 1)
    assert np.all((np.asarray(out.lengths) >= 0) & (np.asarray(out.lengths) < 1))
    np.testing.assert_array_equal(model.class_scores(out), out.lengths)
    # the class capsules are self-attention routing of the primary capsules' votes
    x = images
    for conv, norm in zip(model.convs, model.norms):
        x = norm(jax.nn.relu(conv(x)), use_running_average=True)
    u_hat = capsjax.capsule_predictions(model.classes.W[...], model.primary(x))
    np.testing.assert_allclose(out.capsules, routing.self_attention(u_hat, model.classes.log_priors[...]).poses,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    terms = model.per_example_losses(labelled, images, labels, capsjax.config.LossConfig())
    assert set(terms) == {"margin_loss", "recon_loss", "loss"} and terms["loss"].shape == (3,)
    with pytest.raises(ValueError, match=r"expects images \[batch, 12, 12, 1\]"):
        model(jnp.zeros((2, 28, 28, 1)))


def test_batch_norm_uses_batch_statistics_only_with_a_key():
    model = capsjax.build_model(TINY, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(4, 12, 12, 1)), jnp.float32)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    evaluated = model(images)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))))
    trained = model(images, key=jax.random.key(0))
    after = nnx.state(model, nnx.BatchStat)
    # running mean of the first layer: 0.99 * 0 + 0.01 * the batch mean of its ReLU output
    first = jax.nn.relu(model.convs[0](images))
    np.testing.assert_allclose(after["norms"][0]["mean"][...], 0.01 * np.asarray(first).mean((0, 1, 2)), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert not np.allclose(trained.lengths, evaluated.lengths)


@pytest.mark.slow
def test_train_step_lowers_the_loss_and_carries_the_running_statistics():
    """The trainer's jitted, data-parallel step: zero gradients for the statistics, which take the forward pass's."""
    optim = OptimConfig(learning_rate=3e-3)
    graphdef, state = init_state(TINY, optim, seed=0)
    steps = make_steps(graphdef, optim)
    images = jnp.asarray(RNG.integers(0, 256, size=(8, 12, 12, 1)), jnp.uint8)
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    start = jax.tree.map(np.asarray, state.params)
    losses = []
    for _ in range(20):
        state, metrics = steps.train(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0]
    mean = state.params["norms"][0]["mean"][...]
    assert not np.allclose(mean, start["norms"][0]["mean"]) and np.all(np.asarray(mean) >= 0)  # ReLU outputs' mean
    sums = steps.evaluate(state.params, images, labels, jnp.ones(8, jnp.float32))
    assert float(sums["count"]) == 8 and np.isfinite(float(sums["loss"]))


def test_preset_and_schedule():
    config = get_config("efficient_capsnet")
    assert config.model.arch == "efficient_capsnet" and config.batch_size == 16 and config.epochs == 150
    schedule = make_schedule(config.optim)
    per_epoch = 55_000 // 16
    np.testing.assert_allclose(float(schedule(per_epoch - 1)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(per_epoch)), 5e-4 * 0.97, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100 * per_epoch)), 5e-5, rtol=1e-6)  # 0.97^100 x 5e-4 < 5e-5
    np.testing.assert_allclose(float(make_schedule(OptimConfig())(2000)), 1e-3 * 0.96, rtol=1e-6)  # no floor
    unused = config.model.unused_fields
    assert "conv1_channels" in unused and "routing" in unused and "cnn_channels" in unused
    assert "primary_dim" not in unused and "effcaps_stem_channels" not in unused
    assert "effcaps_stem_channels" in get_config("default").model.unused_fields
    with pytest.raises(ValueError, match="multiple of primary_dim"):
        dataclasses.replace(EFFICIENT, primary_dim=7)
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(EFFICIENT, image_shape=(8, 8, 1))
