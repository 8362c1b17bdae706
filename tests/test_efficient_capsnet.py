"""Efficient-CapsNet (capsjax.efficient_capsnet): parameter count, layers against references, Batch Normalization's
two modes and its statistics in the train state, the preset, its schedule and its authors' augmentation."""

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
    np.testing.assert_allclose(out.capsules, routing.self_attention(u_hat, log_priors=model.classes.log_priors[...]).poses,
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
    from capsjax.data.augment import efficient_capsnet_augmentation  # the preset's, inside the same jitted step

    augmented = make_steps(graphdef, optim, augment=efficient_capsnet_augmentation)
    _, metrics = augmented.train(jax.tree.map(jnp.copy, state), images, labels)  # the steps donate their state
    _, plain = steps.train(state, images, labels)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != float(plain["loss"])


def test_preset_and_schedule():
    config = get_config("efficient_capsnet")
    assert config.model.arch == "efficient_capsnet" and config.batch_size == 16 and config.epochs == 150
    assert config.augmentation == "efficient_capsnet" and config.max_shift == 0
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


# ---- the authors' augmentation (capsjax.data.augment)


def _mnist_like(n: int, seed: int = 0) -> np.ndarray:
    """Float [n, 28, 28, 1] images in [0, 1] with ink in a random box inside margins of 2..8 pixels."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28, 1), np.float32)
    for k in range(n):
        top, left, bottom, right = rng.integers(2, 9, 4)
        box = (28 - bottom - top, 28 - right - left)
        images[k, top : 28 - bottom, left : 28 - right, 0] = rng.uniform(0.1, 1.0, box)
    return images


def test_rotation_turns_counter_clockwise_about_the_centre():
    from capsjax.data.augment import rotate_images

    images = RNG.uniform(size=(3, 7, 7, 2)).astype(np.float32)
    out = np.asarray(rotate_images(jnp.asarray(images), jnp.array([0.0, 90.0, -90.0])))
    np.testing.assert_allclose(out[0], images[0], atol=1e-6)
    np.testing.assert_allclose(out[1], np.rot90(images[1], 1), atol=1e-5)  # as displayed, rows going down
    np.testing.assert_allclose(out[2], np.rot90(images[2], -1), atol=1e-5)
    half = np.asarray(rotate_images(jnp.ones((1, 9, 9, 1)), jnp.array([45.0])))[0, ..., 0]
    assert half[4, 4] == pytest.approx(1.0) and half[0, 0] == 0.0  # the corners come from outside: black


def test_margin_shift_moves_the_ink_inside_its_margins_both_ways():
    from capsjax.data.augment import random_margin_shift

    images = _mnist_like(256)
    out = np.asarray(random_margin_shift(jax.random.key(0), jnp.asarray(images)))
    np.testing.assert_allclose(out.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=1e-5)  # no ink lost
    moves = []
    for before, after in zip(images[..., 0], out[..., 0]):
        (r0, c0), (r1, c1) = np.argwhere(before > 0).min(0), np.argwhere(after > 0).min(0)
        np.testing.assert_array_equal(np.roll(before, (r1 - r0, c1 - c0), axis=(0, 1)), after)  # a pure translation
        moves.append((r1 - r0, c1 - c0))
    moves = np.array(moves)
    assert (moves > 0).any(axis=0).all() and (moves < 0).any(axis=0).all() and (moves == 0).any()
    assert np.abs(moves).max() <= 8  # at most the margin (2..8 here)
    empty = jnp.zeros((2, 28, 28, 1))
    assert not np.asarray(random_margin_shift(jax.random.key(1), empty)).any()


def test_squish_narrows_by_1_to_7_columns_and_keeps_a_constant_image_constant():
    from capsjax.data.augment import random_squish

    out = np.asarray(random_squish(jax.random.key(0), jnp.full((512, 28, 28, 1), 0.5)))
    black = (out[:, 0, :, 0] == 0).sum(axis=1)  # the columns the narrowed image leaves black
    assert set(np.unique(black)) <= set(range(1, 8)) and {1, 2, 3} <= set(np.unique(black))
    for row, m in zip(out[:, :, :, 0], black):
        inside = row[:, row[0] > 0]
        assert inside.shape[1] == 28 - m
        np.testing.assert_allclose(inside, 0.5, atol=1e-5)  # Lanczos weights sum to 1 inside the image
        first = int(np.argmax(row[0] > 0))
        assert first in (m // 2, m // 2 + 1)  # placed m // 2 (or one more) columns from the left


def test_erase_blacks_out_one_4x4_patch_inside_the_border():
    from capsjax.data.augment import random_erase

    out = np.asarray(random_erase(jax.random.key(0), jnp.ones((512, 28, 28, 1))))[..., 0]
    corners = []
    for image in out:
        zeros = np.argwhere(image == 0)
        assert len(zeros) == 16 and np.all(zeros.max(0) - zeros.min(0) == 3)
        corners.append(zeros.min(0))
    corners = np.array(corners)
    assert corners.min() == 4 and corners.max() == 22  # the authors' floor(19 u) + 4


def test_efficient_capsnet_augmentation_is_reproducible_jit_equal_and_in_range():
    from capsjax.data.augment import efficient_capsnet_augmentation, train_augmentation

    images = jnp.asarray(_mnist_like(32, seed=1))
    key = jax.random.key(7)
    out = np.asarray(efficient_capsnet_augmentation(key, images))
    assert out.shape == images.shape and out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(np.asarray(jax.jit(efficient_capsnet_augmentation)(key, images)), out, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(efficient_capsnet_augmentation(key, images)), out)
    assert not np.allclose(np.asarray(efficient_capsnet_augmentation(jax.random.key(8), images)), out)
    assert train_augmentation(augmentation="efficient_capsnet") is efficient_capsnet_augmentation
    with pytest.raises(ValueError, match="set max_shift=0"):
        train_augmentation(max_shift=2, augmentation="efficient_capsnet")
    from capsjax.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="moves the digits itself"):
        TrainConfig(augmentation="efficient_capsnet")  # the default max_shift=2
    with pytest.raises(ConfigError, match="augmentation must be"):
        TrainConfig(augmentation="rotate", max_shift=0)


def test_nnx_train_and_eval_modes_and_an_empty_batch():
    model, x = EfficientCapsNet(TINY, rngs=nnx.Rngs(0)), jnp.asarray(RNG.uniform(size=(4, 12, 12, 1)), jnp.float32)

    def stats():
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    start = stats()
    model(jnp.zeros((0, 12, 12, 1)), key=jax.random.key(0))  # was a ZeroDivisionError after storing NaN statistics
    assert all(np.array_equal(a, b) for a, b in zip(start, stats()))
    model(x)  # evaluation (the default): the running statistics
    assert all(np.array_equal(a, b) for a, b in zip(start, stats()))
    model.train()  # NNX's training mode: the batch's statistics, updated (was: ignored without a key)
    model(x)
    trained = stats()
    assert not all(np.allclose(a, b) for a, b in zip(start, trained))
    model.eval()
    model(x)
    assert all(np.array_equal(a, b) for a, b in zip(trained, stats()))
    assert np.isfinite(np.asarray(model(x).lengths)).all()
