"""Mixed precision (capsjax.precision): bfloat16 operands with float32 accumulation, forward and backward, close to
float32; everything else float32."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import capsjax
from capsjax import fast, precision
from capsjax.config import ConfigError, OptimConfig, TrainConfig, from_dict, get_config, to_dict

RNG = np.random.default_rng(0)
# bfloat16 keeps 8 significant bits: a product of operands rounded to it is off by ~2^-8 relative per term.
BF16_RTOL = 2e-2
SMALL = capsjax.ModelConfig(
    image_shape=(16, 16, 1), conv1_channels=16, conv1_kernel=5, primary_maps=4, primary_dim=4, primary_kernel=5,
    class_dim=8, decoder_hidden=(32, 64),
)  # fmt: skip


def dot_operand_types(fn, *args) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every matrix product JAX emits for ``fn`` (its StableHLO, before XLA's
    backend-specific passes: a CPU without bfloat16 arithmetic converts such products back to float32 itself)."""
    text = jax.jit(fn).lower(*args).as_text()
    pattern = r"stablehlo\.(?:dot_general|convolution).*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\) -> tensor<[^>]*x(\w+)>"
    return [match.groups() for match in re.finditer(pattern, text)]


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_mixed_matmul_values_and_gradients_are_float32_products_of_bfloat16_operands():
    x = jnp.asarray(RNG.normal(size=(64, 96)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(96, 48)), jnp.float32)
    g = jnp.asarray(RNG.normal(size=(64, 48)), jnp.float32)

    def loss(x, w, mode):
        return jnp.sum(precision.matmul(x, w, mode) * g)

    y = precision.matmul(x, w, "mixed")
    assert y.dtype == jnp.float32
    # exactly the float32 product of the rounded operands
    xb, wb = (np.asarray(a.astype(jnp.bfloat16), np.float64) for a in (x, w))
    np.testing.assert_allclose(y, xb @ wb, rtol=1e-5, atol=1e-4)
    grads = jax.grad(loss, argnums=(0, 1))(x, w, "mixed")
    grads32 = jax.grad(loss, argnums=(0, 1))(x, w, "float32")
    for got, want in zip(grads, grads32):
        assert got.dtype == jnp.float32
        assert relative_error(got, want) < BF16_RTOL
    # every product of the gradient runs on bfloat16 operands into float32
    dots = dot_operand_types(jax.grad(lambda x, w: loss(x, w, "mixed"), argnums=(0, 1)), x, w)
    assert len(dots) >= 2 and all(d == ("bf16", "bf16", "f32") for d in dots), dots


def test_mixed_matmul_rejects_other_operand_dtypes_and_unknown_precisions():
    with pytest.raises(ValueError, match="float32 operands"):
        precision.matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.float32), "mixed")
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.compute_dtype("half")


@pytest.mark.parametrize("channels", [1, 16])  # the patch matmul (conv1) and the kernel-row loop (primary capsules)
def test_fast_conv_in_bfloat16_is_close_to_float32_with_bfloat16_products_only(channels):
    x = jnp.asarray(RNG.normal(size=(3, 13, 13, channels)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(5, 5, channels, 8)) / 5, jnp.float32)
    g = jnp.asarray(RNG.normal(size=(3, 5, 5, 8)), jnp.float32)

    def loss(x, k, dtype):
        return jnp.sum(fast.conv2d(x, k, 2, compute_dtype=dtype) * g)

    out = fast.conv2d(x, k, 2, compute_dtype=jnp.bfloat16)
    assert out.dtype == jnp.float32
    assert relative_error(out, fast.conv2d(x, k, 2)) < BF16_RTOL
    got = jax.grad(loss, argnums=(0, 1))(x, k, jnp.bfloat16)
    want = jax.grad(loss, argnums=(0, 1))(x, k, None)
    for a, b in zip(got, want):
        assert a.dtype == jnp.float32 and relative_error(a, b) < BF16_RTOL
    dots = dot_operand_types(jax.grad(lambda x, k: loss(x, k, jnp.bfloat16), argnums=(0, 1)), x, k)
    assert dots and all(d == ("bf16", "bf16", "f32") for d in dots), dots


def compiled_dot_contractions(fn, *args) -> list[str]:
    """The contracting dimensions of every product in ``fn``'s compiled HLO, e.g. ``"lhs={1} rhs={0}"``."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return [f"lhs={lhs} rhs={rhs}" for lhs, rhs in re.findall(
        r" dot\(.*?lhs_contracting_dims=(\{[\d,]*\}), rhs_contracting_dims=(\{[\d,]*\})", text)]  # fmt: skip


def test_row_major_transpose_is_a_transpose():
    a = jnp.asarray(RNG.normal(size=(3, 4, 5)), jnp.bfloat16)
    np.testing.assert_array_equal(precision.row_major_transpose(a), a.transpose())
    np.testing.assert_array_equal(precision.row_major_transpose(a, (0, 2, 1)), a.transpose(0, 2, 1))
    assert precision.row_major_transpose(a).dtype == jnp.bfloat16


def test_mixed_gradient_products_take_row_major_operands():
    """XLA's CPU backend multiplies bfloat16 fast only on row-major operands (``benchmarks/matmul.py --gradients``):
    with a transposed operand folded into the product (``lhs_contracting_dims={0}``, ``rhs_contracting_dims={1}``) the
    primary-capsule convolution's gradient products ran 2-4x slower, and that CPU even converted such an operand to
    float32. Every product of the mixed gradients of the kernel-row convolution (the primary capsules') and of
    :func:`capsjax.precision.matmul` must contract the left operand's rows with the right one's columns."""
    x = jnp.asarray(RNG.normal(size=(2, 13, 13, 16)), jnp.float32)
    k = jnp.asarray(RNG.normal(size=(5, 5, 16, 8)) / 5, jnp.float32)
    conv_grads = compiled_dot_contractions(
        jax.grad(lambda x, k: jnp.sum(fast.conv2d(x, k, 2, compute_dtype=jnp.bfloat16) ** 2), argnums=(0, 1)), x, k
    )
    a, w = jnp.asarray(RNG.normal(size=(4, 6)), jnp.float32), jnp.asarray(RNG.normal(size=(6, 7)), jnp.float32)
    matmul_grads = compiled_dot_contractions(
        jax.grad(lambda a, w: jnp.sum(precision.matmul(a, w, "mixed") ** 2), argnums=(0, 1)), a, w
    )
    for found in (conv_grads, matmul_grads):
        assert len(found) >= 2 and set(found) == {"lhs={1} rhs={0}"}, found


def test_float32_precision_compiles_no_bfloat16():
    model = capsjax.CapsNet(SMALL, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    images = jnp.asarray(RNG.uniform(size=(2, 16, 16, 1)), jnp.float32)

    def loss(params):
        return nnx.merge(graphdef, params)(images, jnp.array([1, 2])).lengths.sum()

    assert "bf16" not in jax.jit(jax.grad(loss)).lower(params).compile().as_text()


@pytest.mark.parametrize("kernels", ["fast", "textbook"])
def test_one_mixed_train_step_matches_float32_within_bfloat16_tolerance(kernels):
    """The loss of one step and the gradients, mixed against float32, from the same parameters and batch.

    Stated tolerances: the loss within 0.1%; the whole gradient (every parameter, one vector) within 2%; each
    parameter's gradient within 15% (the decoder's hidden layers sum many terms that cancel, which magnifies the
    rounding of their bfloat16 operands; measured 0.2-10% there against 0.2-1.5% elsewhere on three batches)."""
    from capsjax.steps import compute_losses

    rng = np.random.default_rng(2)  # the batch with the largest decoder differences of the three measured
    images = jnp.asarray(rng.uniform(size=(8, 16, 16, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    results = {}
    for mode in ("float32", "mixed"):
        config = dataclasses.replace(SMALL, kernels=kernels, precision=mode)
        graphdef, params = nnx.split(capsjax.CapsNet(config, rngs=nnx.Rngs(0)))

        def loss(params, graphdef=graphdef):
            model = nnx.merge(graphdef, params)
            return compute_losses(model, model(images, labels), images, labels, capsjax.config.LossConfig())["loss"]

        results[mode] = jax.jit(jax.value_and_grad(loss))(params)
    (loss32, grads32), (loss16, grads16) = results["float32"], results["mixed"]
    assert abs(float(loss16) - float(loss32)) <= 1e-3 * abs(float(loss32))
    flat32, flat16 = jax.tree.leaves(grads32), jax.tree.leaves(grads16)
    assert all(g.dtype == jnp.float32 for g in flat16)
    whole = relative_error(np.concatenate([np.ravel(g) for g in flat16]), np.concatenate([np.ravel(g) for g in flat32]))
    assert whole < 2e-2, whole
    for (path, g32), g16 in zip(jax.tree_util.tree_leaves_with_path(grads32), flat16):
        assert relative_error(g16, g32) < 0.15, (jax.tree_util.keystr(path), relative_error(g16, g32))


def test_mixed_parameters_and_optimizer_state_stay_float32():
    from capsjax.steps import init_state

    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    _, state = init_state(dataclasses.replace(SMALL, precision="mixed"), OptimConfig(), seed=0, mesh=mesh)
    dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state)) if leaf.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_precision_config_field_validation_and_the_old_conv_dtype_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        capsjax.ModelConfig(precision="bfloat16")
    assert get_config("accelerator").model.precision == "mixed"
    old = to_dict(TrainConfig())
    del old["model"]["precision"]
    for conv_dtype, expected in (("float32", "float32"), ("bfloat16", "mixed")):
        old["model"]["conv_dtype"] = conv_dtype
        assert from_dict(TrainConfig, json.loads(json.dumps(old))).model.precision == expected
    old["model"]["nonsense"] = 1
    with pytest.raises(ConfigError, match="nonsense"):
        from_dict(TrainConfig, old)


def test_matmul_refuses_other_ranks_in_both_precisions():
    # a 3-D x went through the mixed forward and failed only in the backward pass, inside dot_general
    for mode in ("float32", "mixed"):
        with pytest.raises(ValueError, match=r"matmul multiplies x \[B, d_in\] by w \[d_in, d_out\], got \(2, 3, 4\)"):
            jax.grad(lambda w: precision.matmul(jnp.ones((2, 3, 4)), w, mode).sum())(jnp.ones((4, 5)))
