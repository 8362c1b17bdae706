"""The model registry and contract, and the paper's baseline CNN."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

import capsjax
from capsjax import data as datalib
from capsjax.baseline import cross_entropy, dropout
from capsjax.config import (
    ARCHS, ConfigError, LossConfig, ModelConfig, OptimConfig, TrainConfig, get_config, replace_path,
)  # fmt: skip
from capsjax.layers import Conv2D
from capsjax.steps import correct_predictions, init_state, make_steps

RNG = np.random.default_rng(5)

TINY_CNN = ModelConfig(arch="cnn", image_shape=(12, 12, 1), cnn_channels=(8, 8, 4), cnn_kernel=5, cnn_hidden=(16, 12))


def test_registry_names_every_arch():
    assert set(capsjax.MODELS) == set(ARCHS)
    assert isinstance(capsjax.build_model(TINY_CNN, rngs=nnx.Rngs(0)), capsjax.BaselineCNN)
    capsnet = nnx.eval_shape(lambda: capsjax.build_model(ModelConfig(), rngs=nnx.Rngs(0)))
    assert isinstance(capsnet, capsjax.CapsNet)
    with pytest.raises(ValueError, match="arch must be one of"):
        ModelConfig(arch="resnet")
    with pytest.raises(ConfigError, match="arch must be one of"):
        replace_path(get_config("default"), "model.arch", "resnet")


def test_baseline_parameter_count_is_the_papers():
    """35.4M on MNIST (SAME padding, no pooling: 28 x 28 x 128 inputs to the 328-unit layer)."""
    model = nnx.eval_shape(lambda: capsjax.build_model(ModelConfig(arch="cnn"), rngs=nnx.Rngs(0)))
    convs = 5 * 5 * 1 * 256 + 256 + 5 * 5 * 256 * 256 + 256 + 5 * 5 * 256 * 128 + 128
    dense = 28 * 28 * 128 * 328 + 328 + 328 * 192 + 192 + 192 * 10 + 10
    assert capsjax.count_params(model) == convs + dense == 35_445_522
    assert model.hidden[0].kernel.shape == (28 * 28 * 128, 328)


def test_same_convolution_matches_xla_same_padding():
    x = jnp.asarray(RNG.uniform(size=(2, 9, 7, 3)), jnp.float32)
    for kernels, stride, size in (("fast", 1, 5), ("fast", 2, 3), ("textbook", 1, 4)):
        conv = Conv2D(3, 6, size, stride, padding="SAME", kernels=kernels, rngs=nnx.Rngs(0))
        ref = lax.conv_general_dilated(
            x, conv.kernel[...], (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        np.testing.assert_allclose(conv(x), ref + conv.bias[...][None, None, None, :], rtol=1e-5, atol=1e-5)
    assert conv(x).shape == (2, 9, 7, 6)
    fast, textbook = (Conv2D(3, 20, 5, padding="SAME", kernels=k, rngs=nnx.Rngs(1)) for k in ("fast", "textbook"))
    grads = [jax.grad(lambda x, c=c: jnp.sum(jnp.square(c(x))))(x) for c in (fast, textbook)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)


def test_cnn_output_shape_and_dropout_only_with_a_key():
    model = capsjax.build_model(dataclasses.replace(TINY_CNN, cnn_dropout=0.5), rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(3, 12, 12, 1)), jnp.float32)
    out = model(images)
    assert isinstance(out, capsjax.CNNOutput) and out.logits.shape == (3, 10)
    np.testing.assert_array_equal(model(images).logits, out.logits)  # deterministic without a key
    a, b = model(images, key=jax.random.key(1)), model(images, key=jax.random.key(2))
    assert not np.allclose(a.logits, out.logits) and not np.allclose(a.logits, b.logits)
    np.testing.assert_array_equal(model(images, key=jax.random.key(1)).logits, a.logits)
    np.testing.assert_array_equal(model.class_scores(out), out.logits)
    with pytest.raises(ValueError, match=r"expects images \[batch, 12, 12, 1\]"):
        model(jnp.zeros((2, 28, 28, 1)))


def test_dropout_keeps_the_mean_and_zeroes_the_rate():
    x = jnp.ones((200, 500))
    y = np.asarray(dropout(jax.random.key(0), x, 0.3))
    assert abs((y == 0).mean() - 0.3) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01


def test_cross_entropy_softmax_for_labels_and_sigmoid_for_k_hot():
    logits = RNG.normal(size=(4, 10)).astype(np.float32)
    labels = np.array([0, 3, 9, 3])
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), -log_p[np.arange(4), labels],
                               rtol=1e-5)  # fmt: skip
    targets = datalib.two_hot(np.array([[0, 1], [3, 4], [9, 2], [5, 3]]), 10)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    ref = -(targets * np.log(p) + (1 - targets) * np.log(1 - p)).sum(-1)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)), ref, rtol=1e-5)


def test_correct_predictions_for_labels_and_k_hot_sets():
    scores = jnp.array([[0.1, 0.9, 0.8, 0.0], [0.7, 0.1, 0.2, 0.6], [0.5, 0.4, 0.3, 0.2]])
    np.testing.assert_array_equal(correct_predictions(scores, jnp.array([1, 0, 1])), [True, True, False])
    two_hot = jnp.asarray(datalib.two_hot(np.array([[2, 1], [0, 2], [0, 1]]), 4))  # swapped order, one wrong, right
    np.testing.assert_array_equal(correct_predictions(scores, two_hot), [True, False, True])


def _batch(n, shape=(12, 12, 1), seed=0):
    images, labels = datalib.load_synthetic(n, image_shape=shape, seed=seed)
    return images, labels.astype(np.int32)


@pytest.fixture(scope="module")
def cnn_steps():
    """The compiled steps of a tiny CNN with dropout on one device, and a function giving its initial state."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    optim = OptimConfig(learning_rate=3e-3)
    config = dataclasses.replace(TINY_CNN, cnn_dropout=0.5)
    graphdef, state = init_state(config, optim, seed=0, mesh=mesh)
    return make_steps(graphdef, optim, mesh=mesh), lambda: jax.tree.map(jnp.copy, state)  # a copy: train donates


@pytest.mark.parametrize("targets", ["labels", "two_hot"])
def test_cnn_train_step_lowers_the_loss_on_a_fixed_batch(cnn_steps, targets):
    steps, initial = cnn_steps
    state = initial()
    images, labels = _batch(32)
    if targets == "two_hot":
        labels = datalib.two_hot(np.stack([labels, (labels + 3) % 10], axis=1), 10)
    losses = []
    for _ in range(10):
        state, metrics = steps.train(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert set(metrics) >= {"loss", "cross_entropy", "accuracy", "grad_norm", "learning_rate"}
    assert losses[-1] < 0.9 * losses[0], losses
    sums = jax.device_get(steps.evaluate(state.params, images, labels, np.ones(32, np.int32)))
    assert sums["count"] == 32 and ("confusion" in sums) == (targets == "labels")


def test_cnn_dropout_key_follows_the_step(cnn_steps):
    """The train step's dropout key is a function of (state.key, state.step): two runs from one state take the same
    step, and the next step, from the same parameters, draws another mask."""
    steps, initial = cnn_steps
    images, labels = _batch(16)
    params0 = jax.device_get(initial().params)
    _, ma = steps.train(initial(), images, labels)
    b, mb = steps.train(initial(), images, labels)
    np.testing.assert_array_equal(ma["loss"], mb["loss"])
    _, mc = steps.train(b.replace(params=jax.device_put(params0, steps.replicated)), images, labels)
    assert float(mc["loss"]) != float(ma["loss"])


def test_capsnet_follows_the_contract():
    config = ModelConfig(image_shape=(16, 16, 1), conv1_channels=8, conv1_kernel=5, primary_maps=2, primary_dim=4,
                         primary_kernel=5, class_dim=4, decoder_hidden=(16,))  # fmt: skip
    model = capsjax.build_model(config, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(3, 16, 16, 1)), jnp.float32)
    out = model(images, jnp.array([1, 2, 3]), key=jax.random.key(0))
    np.testing.assert_array_equal(model.class_scores(out), out.lengths)
    terms = model.per_example_losses(out, images, jnp.array([1, 2, 3]), LossConfig())
    assert set(terms) == {"margin_loss", "recon_loss", "loss"} and terms["loss"].shape == (3,)
    np.testing.assert_allclose(terms["loss"], terms["margin_loss"] + 0.0005 * terms["recon_loss"], rtol=1e-6)


def test_resume_ignores_the_fields_the_arch_does_not_read(tmp_path):
    from capsjax.workdir import check_resume

    capsnet = get_config("default")
    check_resume(capsnet, replace_path(capsnet, "model.cnn_dropout", "0.3"), tmp_path)
    with pytest.raises(ConfigError, match="model.arch"):
        check_resume(capsnet, replace_path(capsnet, "model.arch", "cnn"), tmp_path)
    with pytest.raises(ConfigError, match="model.class_dim"):
        check_resume(capsnet, replace_path(capsnet, "model.class_dim", "8"), tmp_path)
    cnn = replace_path(capsnet, "model.arch", "cnn")
    check_resume(cnn, replace_path(cnn, "model.class_dim", "8"), tmp_path)
    with pytest.raises(ConfigError, match="model.cnn_hidden"):
        check_resume(cnn, replace_path(cnn, "model.cnn_hidden", "64"), tmp_path)
    assert "cnn_kernel" in ModelConfig().unused_fields and "class_dim" in ModelConfig(arch="cnn").unused_fields
    assert "image_shape" not in ModelConfig().unused_fields + ModelConfig(arch="cnn").unused_fields
    assert isinstance(cnn, TrainConfig)


def test_baseline_preset_and_arch_flag():
    from capsjax.cli import build_train_parser, resolve_train_config

    baseline = get_config("baseline")
    assert baseline.model.arch == "cnn" and baseline.max_shift == get_config("default").max_shift
    args = build_train_parser().parse_args(["--preset", "smoke", "--arch", "cnn", "--set", "model.cnn_hidden=32"])
    config = resolve_train_config(args)
    assert config.model.arch == "cnn" and config.model.cnn_hidden == (32,) and config.dataset == "synthetic"


def test_nnx_training_mode_needs_a_key_for_dropout():
    model, x = capsjax.BaselineCNN(TINY_CNN, rngs=nnx.Rngs(0)), jnp.full((2, 12, 12, 1), 0.5)
    model.train()  # was: no dropout at all, silently
    with pytest.raises(ValueError, match=r"training mode \(model.train\(\)\): pass key=\.\.\. for its dropout"):
        model(x)
    a, b = model(x, key=jax.random.key(0)).logits, model(x, key=jax.random.key(1)).logits
    assert not np.allclose(a, b)
    model.eval()
    assert model(x).logits.shape == (2, 10)  # evaluation needs no key
