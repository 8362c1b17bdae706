"""capsjax.routing: each algorithm against its NumPy reference (values in float64 and float32, gradients by finite
differences), its invariants, jit/vmap, bfloat16, and a short training run that lowers a loss."""

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from jax.test_util import check_grads

from capsjax import ops, routing
from reference import np_routing
from reference_routing import np_concurrent, np_em, np_inverted, np_self_attention

RNG = np.random.default_rng(18)
VECTOR = ("dynamic", "inverted_attention", "self_attention")


def em_inputs(batch=2, n_in=7, n_out=3, pose=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    votes = rng.normal(size=(batch, n_in, n_out, *pose))
    acts = rng.uniform(0.1, 0.9, size=(batch, n_in))
    return votes, acts, rng.normal(size=n_out) * 0.3, rng.normal(size=n_out) * 0.3


def run(name, u, **params):
    """Calls a vector routing by name with the parameters it has."""
    if name == "inverted_attention":
        return routing.inverted_attention(u, params.get("iterations", 2), scale=params.get("scale"),
                                          offset=params.get("offset"))  # fmt: skip
    if name == "self_attention":
        return routing.self_attention(u, log_priors=params.get("log_priors"))
    return routing.dynamic(u, params.get("iterations", 3))


# --- values against the NumPy references ------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_dynamic_is_procedure_1_with_lengths(iterations):
    u_hat = RNG.normal(size=(2, 9, 4, 5)) * 0.5
    out = routing.dynamic(jnp.asarray(u_hat, jnp.float32), iterations)
    v_ref, c_ref = np_routing(u_hat, iterations)
    np.testing.assert_allclose(out.poses, v_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.assignments, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.activations, np.linalg.norm(v_ref, axis=-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("pose", [(4, 4), (5,)])
def test_em_matches_reference(iterations, pose):
    votes, acts, beta_u, beta_a = em_inputs(pose=pose)
    with jax.enable_x64(True):
        out = routing.em(jnp.asarray(votes), jnp.asarray(acts), jnp.asarray(beta_u), jnp.asarray(beta_a), iterations)
        assert out.poses.dtype == jnp.float64
    mu, a, r = np_em(votes, acts, beta_u, beta_a, iterations)
    assert out.poses.shape == (2, 3, *pose) and out.activations.shape == (2, 3) and out.assignments.shape == (2, 7, 3)
    np.testing.assert_allclose(out.poses, mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.activations, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.assignments, r, rtol=1e-9, atol=1e-12)


def test_em_options_and_float32():
    votes, acts, beta_u, beta_a = em_inputs(n_in=11, n_out=4)
    kwargs = dict(final_inverse_temperature=0.3, cost_scale=0.05)
    out = routing.em(jnp.asarray(votes, jnp.float32), jnp.asarray(acts, jnp.float32), jnp.asarray(beta_u, jnp.float32),
                     jnp.asarray(beta_a, jnp.float32), 3, **kwargs)  # fmt: skip
    mu, a, r = np_em(votes, acts, beta_u, beta_a, 3, final_lambda=0.3, cost_scale=0.05)
    np.testing.assert_allclose(out.poses, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.activations, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.assignments, r, rtol=1e-4, atol=1e-5)
    # scalar betas broadcast over the parents
    scalar = routing.em(jnp.asarray(votes), jnp.asarray(acts), 0.2, -0.1)
    np.testing.assert_allclose(scalar.activations, np_em(votes, acts, [0.2] * 4, [-0.1] * 4, 3)[1], rtol=1e-4)
    # the schedule: lambda_t = final (1 - 0.95^(t+1))
    np.testing.assert_allclose(routing.inverse_temperature(2, 0.01), 0.01 * (1 - 0.95**3), rtol=1e-6)


def test_em_votes_from_pose_matrices():
    weights = RNG.normal(size=(5, 3, 4, 4))
    poses = RNG.normal(size=(2, 5, 4, 4))
    expected = np.einsum("bixk,ijky->bijxy", poses, weights)
    np.testing.assert_allclose(routing.matrix_votes(jnp.asarray(weights), jnp.asarray(poses)), expected, rtol=1e-5,
                               atol=1e-5)  # fmt: skip
    np.testing.assert_allclose(expected[1, 2, 1], poses[1, 2] @ weights[2, 1], rtol=1e-12)
    with pytest.raises(ValueError, match=r"\[\.\.\., 5, p, 4\]"):
        routing.matrix_votes(jnp.asarray(weights), jnp.zeros((2, 4, 4, 4)))


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_inverted_attention_matches_reference(iterations):
    u_hat = RNG.normal(size=(2, 8, 3, 6))
    scale, offset = RNG.normal(size=6), RNG.normal(size=6)
    with jax.enable_x64(True):
        out = routing.inverted_attention(jnp.asarray(u_hat), iterations, scale=jnp.asarray(scale),
                                         offset=jnp.asarray(offset))  # fmt: skip
    v_ref, r_ref = np_inverted(u_hat, iterations, scale, offset)
    assert out.activations is None
    np.testing.assert_allclose(out.poses, v_ref, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(out.assignments, r_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_concurrent_routing_matches_reference(iterations):
    x = RNG.normal(size=(6, 4))
    weights = [RNG.normal(size=(6, 5, 3, 4)) * 0.5, RNG.normal(size=(5, 2, 8, 3)) * 0.5]
    scales = [RNG.normal(size=3), RNG.normal(size=8)]
    offsets = [RNG.normal(size=3), RNG.normal(size=8)]
    with jax.enable_x64(True):
        fns = [lambda p, w=jnp.asarray(w): ops.capsule_predictions(w, p) for w in weights]
        got = routing.concurrent_inverted_attention(jnp.asarray(x), fns, iterations, scales=scales, offsets=offsets)
    expected = np_concurrent(x, weights, iterations, scales, offsets)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
    # with two layers and two iterations, concurrent differs from routing the layers one after the other
    if iterations == 2:
        first = np_inverted(np.einsum("ijdk,ik->ijd", weights[0], x)[None], 2, scales[0], offsets[0])[0][0]
        sequential = np_inverted(np.einsum("ijdk,ik->ijd", weights[1], first)[None], 2, scales[1], offsets[1])[0][0]
        assert not np.allclose(got[1], sequential, atol=1e-3)


def test_concurrent_routing_of_one_layer_is_inverted_attention():
    u = jnp.asarray(RNG.normal(size=(2, 6, 4)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(6, 3, 5, 4)), jnp.float32)
    (v,) = routing.concurrent_inverted_attention(u, [lambda p: ops.capsule_predictions(w, p)], 3)
    np.testing.assert_allclose(v, routing.inverted_attention(ops.capsule_predictions(w, u), 3).poses, rtol=1e-5,
                               atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("with_priors", [False, True])
def test_self_attention_matches_reference_with_the_full_attention_matrix(with_priors):
    u_hat = RNG.normal(size=(3, 10, 4, 6)) * 0.3
    priors = RNG.normal(size=(10, 4)) * 0.2 if with_priors else np.zeros((10, 4))
    with jax.enable_x64(True):
        out = routing.self_attention(jnp.asarray(u_hat), log_priors=jnp.asarray(priors) if with_priors else None)
    v_ref, c_ref = np_self_attention(u_hat, priors)
    np.testing.assert_allclose(out.poses, v_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.assignments, c_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.activations, np.linalg.norm(v_ref, axis=-1), rtol=1e-6, atol=1e-6)


def test_exp_squash_hand_values():
    # |(3, 4)| = 5: length 1 - e^-5, direction kept; 0 -> 0
    np.testing.assert_allclose(routing.exp_squash(jnp.array([3.0, 4.0])), np.array([3, 4]) / 5 * (1 - np.exp(-5)),
                               rtol=1e-6)  # fmt: skip
    assert np.all(np.asarray(routing.exp_squash(jnp.zeros((2, 8)))) == 0)
    assert np.all(np.isfinite(np.asarray(jax.grad(lambda s: jnp.sum(routing.exp_squash(s)))(jnp.zeros((2, 8))))))


# --- gradients (float64, finite differences) ---------------------------------------------------------------------------


GRADIENT_CASES = {  # name -> (function of arrays, its float64 arguments)
    "dynamic": lambda: (lambda u: routing.dynamic(u, 3).activations, (RNG.normal(size=(2, 5, 3, 4)),)),
    "em": lambda: (lambda v, a, bu, ba: routing.em(v, a, bu, ba, 3)[:2], em_inputs(batch=1, n_in=5, n_out=3, pose=(2, 2))),
    "inverted_attention": lambda: (
        lambda u, s, o: routing.inverted_attention(u, 3, scale=s, offset=o).poses,
        (RNG.normal(size=(2, 5, 3, 4)), RNG.normal(size=4), RNG.normal(size=4)),
    ),
    "self_attention": lambda: (
        lambda u, b: routing.self_attention(u, log_priors=b).poses,
        (RNG.normal(size=(2, 5, 3, 4)) * 0.3, RNG.normal(size=(5, 3)) * 0.1),
    ),
}


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_gradients_match_finite_differences(name):
    """Every argument's gradient, forward and reverse mode, against central differences in float64."""
    fn, args = GRADIENT_CASES[name]()
    with jax.enable_x64(True):
        check_grads(jax.jit(fn), tuple(jnp.asarray(a, jnp.float64) for a in args), order=1, modes=("fwd", "rev"),
                    eps=1e-6)  # fmt: skip


# --- invariants, transformations, dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_assignments_sum_to_one_over_parents_and_shapes(name):
    if name == "em":
        votes, acts, beta_u, beta_a = (jnp.asarray(x, jnp.float32) for x in em_inputs(batch=3, n_in=12, n_out=5))
        out = routing.em(votes, acts, beta_u, beta_a)
        assert out.poses.shape == (3, 5, 4, 4)
    else:
        out = run(name, jnp.asarray(RNG.normal(size=(3, 12, 5, 6)), jnp.float32))
        assert out.poses.shape == (3, 5, 6)
    assert out.assignments.shape == (3, 12, 5)
    c = np.asarray(out.assignments)
    np.testing.assert_allclose(c.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(c.sum(-2), 1.0)  # the normalised axis is the parents', not the children's
    if out.activations is not None:
        a = np.asarray(out.activations)
        assert a.shape == (3, 5) and np.all((a >= 0) & (a <= 1))


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_jit_and_vmap_equal_eager(name):
    if name == "em":
        votes, acts, beta_u, beta_a = (jnp.asarray(x, jnp.float32) for x in em_inputs(batch=3))
        fn = lambda v, a: routing.em(v, a, beta_u, beta_a)  # noqa: E731
        args = (votes, acts)
    else:
        fn = lambda u: run(name, u)  # noqa: E731
        args = (jnp.asarray(RNG.normal(size=(3, 9, 4, 6)), jnp.float32),)
    eager, jitted, mapped = fn(*args), jax.jit(fn)(*args), jax.vmap(fn)(*args)
    for a, b, c in zip(eager, jitted, mapped):
        if a is not None:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_bfloat16_runs_finite_and_close_to_float32(name):
    if name == "em":
        votes, acts, beta_u, beta_a = em_inputs(batch=2, n_in=16, n_out=4)

        def fn(v):
            return routing.em(v, jnp.asarray(acts, v.dtype), jnp.asarray(beta_u), jnp.asarray(beta_a))

        x = jnp.asarray(votes, jnp.float32)
    else:
        x = jnp.asarray(RNG.normal(size=(2, 16, 4, 8)) * 0.3, jnp.float32)
        fn = lambda u: run(name, u)  # noqa: E731
    full, half = fn(x), fn(x.astype(jnp.bfloat16))
    assert half.poses.dtype == jnp.bfloat16 and half.assignments.dtype == jnp.float32
    # the votes themselves are rounded to bfloat16 (3 significant digits); everything after runs in float32
    np.testing.assert_allclose(np.asarray(half.poses.astype(jnp.float32)), full.poses, rtol=5e-2, atol=5e-2)
    np.testing.assert_allclose(half.assignments, full.assignments, rtol=5e-2, atol=2e-2)
    grad = jax.grad(lambda u: jnp.sum(fn(u).poses.astype(jnp.float32)))(x.astype(jnp.bfloat16))
    assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad.astype(jnp.float32))))


def test_get_and_bad_arguments():
    assert routing.get("em") is routing.em
    with pytest.raises(ValueError, match="unknown routing algorithm 'capsule'; choose one of: dynamic, em"):
        routing.get("capsule")
    with pytest.raises(ValueError, match="num_iterations"):
        routing.inverted_attention(jnp.zeros((2, 3, 4, 5)), 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., n_in, n_out, d\]"):
        routing.self_attention(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not match"):
        routing.em(jnp.zeros((2, 5, 3, 4, 4)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="beta_u"):
        routing.em(jnp.zeros((2, 5, 3, 4, 4)), jnp.zeros((2, 5)), jnp.zeros(4))


def test_misuse_is_a_clear_error_not_a_wrong_result():
    # each of these was a silent wrong result, a NaN, or an error from deep inside JAX
    u = jnp.asarray(RNG.normal(size=(2, 5, 3, 4)), jnp.float32)
    votes, acts = jnp.asarray(RNG.normal(size=(2, 5, 3, 2, 2)), jnp.float32), jnp.full((2, 5), 0.5)
    with pytest.raises(TypeError, match="positional"):  # was log_priors=3, added to every coupling weight
        routing.get("self_attention")(u, 3)
    with pytest.raises(ValueError, match="do not match"):  # was "activations must be floating point ... int32"
        routing.get("em")(votes, 3)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\].*logits\?"):  # all-NaN poses
        routing.em(votes, jnp.asarray(RNG.normal(size=(2, 5)), jnp.float32))
    for bad in ({"epsilon": 0.0}, {"epsilon": -1.0}, {"final_inverse_temperature": 0.0},
                {"final_inverse_temperature": float("nan")}, {"cost_scale": -1.0}):  # fmt: skip
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            routing.em(votes, acts, **bad)
    with pytest.raises(ValueError, match="at least one child"):  # ZeroDivisionError
        routing.em(jnp.zeros((2, 0, 3, 2, 2)), jnp.zeros((2, 0)))
    one_layer = [lambda x: jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], 3, x.shape[-1]))]
    for fn in (
        lambda: routing.inverted_attention(u, epsilon=-10.0),
        lambda: routing.layer_norm(jnp.ones(4), epsilon=0.0),
        lambda: routing.concurrent_inverted_attention(u[:, :, 0], one_layer, epsilon=-1.0),
    ):
        with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
            fn()
    with pytest.raises(TypeError, match=r"a list of functions.*pass \[vote_fn\]"):
        routing.concurrent_inverted_attention(u[:, :, 0], one_layer[0])
    with pytest.raises(TypeError, match="exp_squash's input must be floating point"):  # was [0 0]
        routing.exp_squash(jnp.array([3, 4]))
    for name in ("dynamic", "inverted_attention", "self_attention"):  # the same TypeError as capsjax.ops
        with pytest.raises(TypeError, match="votes must be floating point"):
            routing.get(name)(jnp.zeros((2, 5, 3, 4), jnp.int32))
    with pytest.raises(TypeError, match="num_iterations must be an int >= 1, got True"):
        routing.dynamic(u, True)
    # the checks of values run where the values are known, and stay out of the way under jit
    assert jax.jit(lambda v: routing.em(v, acts).activations)(votes).shape == (2, 3)  # acts captured: concrete
    np.testing.assert_allclose(routing.layer_norm(jnp.arange(4)), [-1.3416, -0.4472, 0.4472, 1.3416], atol=1e-4)
    with pytest.raises(ValueError, match=r"weights must have shape \[n_in, n_out, k, q\]"):
        routing.matrix_votes(jnp.zeros((5, 3, 2)), jnp.zeros((2, 5, 2, 2)))
    with pytest.raises(TypeError, match="weights must be floating point"):
        routing.matrix_votes(jnp.zeros((5, 3, 2, 2), jnp.int32), jnp.zeros((2, 5, 2, 2)))
    # nested lists work wherever arrays do (they failed with AttributeError)
    as_list = np.asarray(u).tolist()
    np.testing.assert_allclose(routing.dynamic(as_list).poses, routing.dynamic(u).poses, rtol=1e-6)
    bias = [[0.1] * 4] * 3
    expected = ops.dynamic_routing(u, bias=jnp.asarray(bias))
    np.testing.assert_allclose(ops.dynamic_routing(as_list, bias=bias), expected, rtol=1e-6)
    for name in ("self_attention", "inverted_attention"):
        np.testing.assert_allclose(routing.get(name)(as_list).poses, routing.get(name)(u).poses, rtol=1e-6)
    w, m = RNG.normal(size=(5, 3, 2, 2)).astype(np.float32), RNG.normal(size=(2, 5, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(routing.matrix_votes(w.tolist(), m.tolist()), routing.matrix_votes(w, m), rtol=1e-6)


# --- a short training run per algorithm --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_training_lowers_the_loss(name):
    """Learn the vote weights (and the algorithm's own parameters) to classify 12 fixed random capsule sets."""
    n_in, n_out, d_in, d = 8, 3, 4, 4
    key = jax.random.key(0)
    u = jax.random.normal(key, (12, n_in, d_in))
    labels = jnp.arange(12) % n_out
    w_shape = (n_in, n_out, 2, 2) if name == "em" else (n_in, n_out, d, d_in)  # EM: 2x2 pose matrices
    params = {"W": 0.3 * jax.random.normal(jax.random.fold_in(key, 1), w_shape)}
    if name == "em":
        params.update(beta_u=jnp.zeros(n_out), beta_a=jnp.zeros(n_out))
    if name == "inverted_attention":
        params.update(scale=jnp.ones(d), offset=jnp.zeros(d), readout=jnp.zeros(d), readout_bias=jnp.zeros(()))
    if name == "self_attention":
        params.update(log_priors=jnp.zeros((n_in, n_out)))

    def scores(p):
        if name == "em":
            votes = routing.matrix_votes(p["W"], u.reshape(12, n_in, 2, 2))
            return routing.em(votes, jnp.full((12, n_in), 0.5), p["beta_u"], p["beta_a"]).activations
        u_hat = ops.capsule_predictions(p["W"], u)
        if name == "inverted_attention":
            v = routing.inverted_attention(u_hat, 2, scale=p["scale"], offset=p["offset"]).poses
            return jax.nn.sigmoid(v @ p["readout"] + p["readout_bias"])
        if name == "self_attention":
            return routing.self_attention(u_hat, log_priors=p["log_priors"]).activations
        return routing.dynamic(u_hat, 3).activations

    def loss(p):
        return jnp.mean(ops.margin_loss(scores(p), labels))

    tx = optax.adam(0.05)
    state = tx.init(params)

    @jax.jit
    def step(p, state):
        value, grads = jax.value_and_grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, state = tx.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    losses = []
    for _ in range(60):
        params, state, value = step(params, state)  # the loss before the update
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0]
