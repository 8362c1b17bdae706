"""The routing switch in the model: capsjax.routing_layers (CapsuleLayer, PrimaryMatrixCapsules) and
ModelConfig.routing in CapsNet; the default stays the paper's model."""

import dataclasses

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

import capsjax
from capsjax import config as cfg
from capsjax import routing
from capsjax.model import count_params
from capsjax.routing_layers import CapsuleLayer, PrimaryMatrixCapsules

RNG = np.random.default_rng(5)
SMALL = capsjax.ModelConfig(image_shape=(16, 16, 1), conv1_channels=8, conv1_kernel=5, primary_maps=2,
                            primary_dim=4, primary_kernel=5, class_dim=4, decoder_hidden=(16,))  # fmt: skip


def shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


def test_config_routing_names_are_the_routing_algorithms():
    assert cfg.ROUTINGS == tuple(routing.ALGORITHMS)
    assert cfg.replace_path(capsjax.ModelConfig(), "routing", "em").routing == "em"
    with pytest.raises(ValueError, match="routing must be one of"):
        capsjax.ModelConfig(routing="capsule")
    with pytest.raises(ValueError, match="class_dim = p \\* p"):
        capsjax.ModelConfig(routing="em", class_dim=8)
    with pytest.raises(ValueError, match="'dynamic' only"):
        capsjax.ModelConfig(routing="self_attention", routing_bias=True)


def test_default_model_keeps_its_parameters_and_layers():
    """routing="dynamic" builds the same modules and the same parameter tree as before the switch existed."""
    model = nnx.eval_shape(lambda: capsjax.CapsNet(capsjax.ModelConfig(), rngs=nnx.Rngs(0)))
    assert type(model.classes) is capsjax.RoutingCapsules and type(model.primary) is capsjax.PrimaryCapsules
    params = nnx.state(model, nnx.Param)
    assert shapes(params["classes"]) == {"W": (1152, 10, 16, 8)}
    assert sorted(params.keys()) == ["classes", "conv1", "decoder", "primary"]
    assert count_params(model) == 8_215_568


@pytest.mark.parametrize("kernels", ["fast", "textbook"])
def test_capsule_layer_dynamic_equals_routing_capsules(kernels):
    u = jnp.asarray(RNG.normal(size=(3, 6, 4)), jnp.float32)
    layer = CapsuleLayer(6, 4, 3, 5, routing="dynamic", kernels=kernels, rngs=nnx.Rngs(0))
    reference = capsjax.RoutingCapsules(6, 4, 3, 5, kernels=kernels, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.W[...], reference.W[...])
    out = layer(u)
    v, c = reference(u, return_coupling=True)
    np.testing.assert_allclose(out.poses, v, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.assignments, c, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.activations, capsjax.safe_norm(v), rtol=1e-6)


def test_capsule_layer_parameters_and_values_per_algorithm():
    u = jnp.asarray(RNG.normal(size=(2, 6, 4)), jnp.float32)
    layers = {name: CapsuleLayer(6, 4, 3, 4, routing=name, rngs=nnx.Rngs(1)) for name in routing.ALGORITHMS}
    assert shapes(nnx.state(layers["em"], nnx.Param)) == {"W": (6, 3, 2, 2), "beta_a": (3,), "beta_u": (3,)}
    assert shapes(nnx.state(layers["self_attention"], nnx.Param)) == {"W": (6, 3, 4, 4), "log_priors": (6, 3)}
    assert set(nnx.state(layers["inverted_attention"], nnx.Param)) == {"W", "ln_scale", "ln_offset", "readout",
                                                                       "readout_bias"}  # fmt: skip
    layer = layers["self_attention"]
    expected = routing.self_attention(capsjax.capsule_predictions(layer.W[...], u), log_priors=layer.log_priors[...])
    np.testing.assert_allclose(layer(u).poses, expected.poses, rtol=1e-6)
    layer = layers["inverted_attention"]
    out = layer(u)
    poses = routing.inverted_attention(capsjax.capsule_predictions(layer.W[...], u), 3).poses  # scale 1, offset 0
    np.testing.assert_allclose(out.poses, poses, rtol=1e-5, atol=1e-6)
    logits = np.asarray(poses) @ np.asarray(layer.readout[...])
    np.testing.assert_allclose(out.activations, 1 / (1 + np.exp(-logits)), rtol=1e-5)
    layer = layers["em"]
    acts = jnp.asarray(RNG.uniform(size=(2, 6)), jnp.float32)
    expected = routing.em(routing.matrix_votes(layer.W[...], u.reshape(2, 6, 2, 2)), acts, 0.0, 0.0)
    for poses in (u, u.reshape(2, 6, 2, 2)):  # flat or matrix poses
        np.testing.assert_allclose(layer(poses, acts).activations, expected.activations, rtol=1e-6)
    with pytest.raises(ValueError, match="activations"):
        layer(u)
    with pytest.raises(ValueError, match=r"expects poses \[B, 6, 2, 2\]"):
        layer(jnp.zeros((2, 5, 4)), acts)
    with pytest.raises(ValueError, match=r"expects capsules \[B, 6, 4\]"):
        layers["self_attention"](jnp.zeros((2, 6, 5)))
    with pytest.raises(ValueError, match="unknown routing"):
        CapsuleLayer(6, 4, 3, 4, routing="capsule", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="square pose matrices"):
        CapsuleLayer(6, 8, 3, 8, routing="em", rngs=nnx.Rngs(0))


def test_em_inverse_temperature_config():
    assert capsjax.ModelConfig().routing_em_inverse_temperature == 20.0  # not 1: see the README's routing section
    with pytest.raises(ValueError, match="routing_em_inverse_temperature must be > 0"):
        capsjax.ModelConfig(routing="em", routing_em_inverse_temperature=0.0)
    u = jnp.asarray(RNG.normal(size=(2, 6, 4)), jnp.float32)
    acts = jnp.asarray(RNG.uniform(size=(2, 6)), jnp.float32)
    cold, hot = (CapsuleLayer(6, 4, 3, 4, routing="em", em_inverse_temperature=t, rngs=nnx.Rngs(1))
                 for t in (1.0, 20.0))  # fmt: skip
    expected = routing.em(cold.votes(u), acts, 0.0, 0.0, final_inverse_temperature=20.0)
    np.testing.assert_allclose(hot(u, acts).activations, expected.activations, rtol=1e-5)
    assert not np.allclose(cold(u, acts).activations, expected.activations, rtol=1e-3)


def test_primary_matrix_capsules():
    layer = PrimaryMatrixCapsules(3, num_maps=2, pose_dim=4, kernel_size=3, stride=2, rngs=nnx.Rngs(0))
    x = jnp.asarray(RNG.normal(size=(2, 7, 7, 3)), jnp.float32)
    poses, acts = layer(x)
    assert poses.shape == (2, 3 * 3 * 2, 4) and acts.shape == (2, 18)
    y = np.asarray(layer.conv(x))  # [2, 3, 3, 2 * 4 + 2]: poses of both maps first, then their activations
    np.testing.assert_allclose(poses[1, 2 * 2 + 1], y[1, 0, 2, 4:8], rtol=1e-6)  # position (0, 2), map 1
    np.testing.assert_allclose(acts[1, 2 * 2 + 1], 1 / (1 + np.exp(-y[1, 0, 2, 9])), rtol=1e-6)


@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_capsnet_with_each_routing(name):
    config = dataclasses.replace(SMALL, routing=name)
    model = capsjax.CapsNet(config, rngs=nnx.Rngs(0))
    images = jnp.asarray(RNG.uniform(size=(3, 16, 16, 1)), jnp.float32)
    call = nnx.jit(lambda m, x, y: (m(x), m(x, y), m.encode(x)))
    predicted = jnp.asarray([1, 2, 3])
    out, labelled, encoded = call(model, images, predicted)
    assert out.capsules.shape == (3, 10, 4) and out.lengths.shape == (3, 10) and out.reconstructions.shape == (3, 16, 16, 1)
    lengths = np.asarray(out.lengths)
    assert np.all((lengths >= 0) & (lengths <= 1))
    np.testing.assert_allclose(encoded, out.capsules, rtol=1e-6)
    # without labels the decoder sees the capsule of the highest score
    predicted = jnp.argmax(out.lengths, -1)
    np.testing.assert_allclose(call(model, images, predicted)[1].reconstructions, out.reconstructions, rtol=1e-6)
    if name == "em":
        assert type(model.primary) is PrimaryMatrixCapsules and model.classes.W.shape == (4 * 4 * 2, 10, 2, 2)
        # the class scores are EM's activations with the config's final inverse temperature
        poses, acts = model.primary(jax.nn.relu(model.conv1(images)))
        votes = routing.matrix_votes(model.classes.W[...], poses.reshape(3, -1, 2, 2))
        expected = routing.em(votes, acts, 0.0, 0.0, final_inverse_temperature=config.routing_em_inverse_temperature)
        np.testing.assert_allclose(out.lengths, expected.activations, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", routing.ALGORITHMS)
def test_train_step_with_each_routing_lowers_the_loss(name):
    """The trainer's jitted step (sharded over the simulated devices) on one fixed batch of real-looking data."""
    from capsjax.config import OptimConfig
    from capsjax.steps import init_state, make_steps

    config = dataclasses.replace(SMALL, routing=name)
    optim = OptimConfig(learning_rate=3e-3)
    graphdef, state = init_state(config, optim, seed=0)
    steps = make_steps(graphdef, optim)
    images = jnp.asarray(RNG.integers(0, 256, size=(8, 16, 16, 1)), jnp.uint8)
    labels = jnp.arange(8, dtype=jnp.int32) % 10
    losses = []
    for _ in range(25):
        state, metrics = steps.train(state, images, labels)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


def test_routing_table_reads_runs_and_the_benchmark(tmp_path, capsys):
    """benchmarks/routing_table.py on run folders written in the trainer's formats."""
    import importlib.util
    import json
    from pathlib import Path

    from capsjax.config import TrainConfig, save_config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_table.py"
    spec = importlib.util.spec_from_file_location("routing_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for name, accuracy in (("em", 0.98), ("dynamic", 0.99)):
        run = tmp_path / name
        run.mkdir()
        save_config(TrainConfig(model=capsjax.ModelConfig(routing=name)), run / "config.json")
        (run / "results.json").write_text(json.dumps({"test_accuracy": accuracy, "best_validation_accuracy": 0.5,
                                                       "epochs": 2}))  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps({"split": "validation", "epoch_time_s": t}) + "\n"
                                                   for t in (10.0, 30.0, 20.0)))  # fmt: skip
        (run / "command").write_text(f"python train.py --set model.routing={name}\n")
    (tmp_path / "not_a_run").mkdir()
    bench = {"routings": [{"routing": "em", "params": 7, "train_step_s": 0.5, "scratch_mib": 3.0, "peak_rss_mib": 9.0}]}
    (tmp_path / "benchmark.json").write_text(json.dumps(bench) + "\n")
    got = table.main([str(tmp_path), "--json"])
    assert [r["routing"] for r in got] == ["dynamic", "em"]
    assert got[1]["test_accuracy"] == 0.98 and got[1]["epoch_time_s"] == 20.0 and got[1]["train_step_s"] == 0.5
    assert got[0]["params"] is None
    table.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("| em (final λ 20) | 3 | 2 | 50.00% | 98.00% | 20.0 | 7 | 0.5 | 3.0 | 9.0 "
                              "| `python train.py")  # fmt: skip
    # an EM run from before ModelConfig.routing_em_inverse_temperature existed ran with 1
    config = json.loads((tmp_path / "em" / "config.json").read_text())
    del config["model"]["routing_em_inverse_temperature"]
    (tmp_path / "em" / "config.json").write_text(json.dumps(config))
    assert table.main([str(tmp_path), "--json"])[1]["em_inverse_temperature"] == 1.0
    # another architecture ignores model.routing: an Efficient-CapsNet run left at routing "em" is no EM run
    other = tmp_path / "efficient"
    other.mkdir()
    save_config(TrainConfig(model=capsjax.ModelConfig(arch="efficient_capsnet", routing="em")), other / "config.json")
    (other / "results.json").write_text(json.dumps({"test_accuracy": 0.9}))
    row = next(r for r in table.main([str(tmp_path), "--json"]) if r["run"] == "efficient")
    assert row["routing"] == "efficient_capsnet" and row["em_inverse_temperature"] is None
    assert row["routing_iterations"] == "one pass"  # not the unused model.routing_iterations (3)
    other.joinpath("config.json").unlink()  # keep the rest of this test's table as it was
    other.joinpath("results.json").unlink()
    # a folder collected by capsjax.results (record.json) instead of a command file
    (tmp_path / "em" / "command").unlink()
    (tmp_path / "em" / "record.json").write_text(json.dumps({"command": "python train.py --preset quick",
                                                              "machine": "AMD EPYC, 2 cores, AVX2"}))  # fmt: skip
    readme = tmp_path / "README.md"
    begin = table.BEGIN(tmp_path)
    readme.write_text(f"intro\n{begin}\nold\n{table.END}\nrest\n")
    with pytest.raises(SystemExit, match="differs"):
        table.main([str(tmp_path), "--write", str(readme), "--check"])
    table.main([str(tmp_path), "--write", str(readme)])
    text = readme.read_text()
    assert text.startswith(f"intro\n{begin}\n| routing |") and text.endswith(f"{table.END}\nrest\n")
    assert "| `python train.py --preset quick` | AMD EPYC, 2 cores, AVX2 |" in text and "old" not in text
    table.main([str(tmp_path), "--write", str(readme), "--check"])


def test_readme_routing_table_is_generated_from_results(monkeypatch):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "results" / "routing").is_dir():
        pytest.skip("no results/routing folder")
    spec = importlib.util.spec_from_file_location("routing_table", root / "benchmarks" / "routing_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    monkeypatch.chdir(root)
    for folder in ("results/routing", "results/em_temperature"):  # SystemExit names the command to rerun
        table.main([folder, "--write", "README.md", "--check"])


def test_capsule_layer_refuses_what_it_would_ignore_or_compute_in_integers():
    layer = capsjax.CapsuleLayer(6, 4, 3, 8, rngs=nnx.Rngs(0))  # dynamic routing
    u = jnp.ones((2, 6, 4))
    with pytest.raises(ValueError, match="routing 'dynamic' takes no activations: they are EM's"):
        layer(u, jnp.ones((2, 6)))  # was ignored
    for kernels in ("fast", "textbook"):  # the fast kernels routed integers
        layer = capsjax.CapsuleLayer(6, 4, 3, 8, kernels=kernels, rngs=nnx.Rngs(0))
        with pytest.raises(TypeError, match="must be floating point"):
            layer(u.astype(jnp.int32))

