"""MultiMNIST (paper section 6): pair generation, the fixed test set, set scoring, the two-reconstruction loss,
and an end-to-end run through both CLIs."""

import dataclasses
import hashlib

import numpy as np
import pytest

from capsjax import data as datalib
from capsjax import scoring
from capsjax.data.multimnist import merge_digits, multimnist_pairs, place_digits

# ---------------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------------


def _marked(n, num_classes=10):
    """Digits that are one pixel at their top-left corner, valued 1 + index: the pixel reveals which digit was
    placed where."""
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) + 1
    return images, np.arange(n) % num_classes


def _where(canvas):
    """(value, top, left) of the one lit pixel of a [36, 36, 1] canvas."""
    (y, x) = np.argwhere(canvas[..., 0])[0]
    return int(canvas[y, x, 0]), int(y), int(x)


def test_pairs_have_different_classes_shifts_in_bounds_and_the_merge_of_their_digits():
    images, labels = datalib.load_synthetic(300, seed=0)
    images[:, 0, 0, 0] = 1  # a marker pixel at each digit's top-left corner
    batches = list(datalib.multimnist_batches(images, labels, 32, seed=0, epoch=0))
    assert len(batches) == 300 // 32  # an epoch: one pass over the base digits
    for batch in batches:
        merged, two, classes, digits = batch["images"], batch["labels"], batch["classes"], batch["digits"]
        assert merged.shape == (32, 36, 36, 1) and merged.dtype == np.uint8
        assert digits.shape == (32, 2, 36, 36, 1) and digits.dtype == np.uint8
        assert two.shape == (32, 10) and classes.shape == (32, 2) and classes.dtype == np.int32
        assert (classes[:, 0] != classes[:, 1]).all()
        np.testing.assert_array_equal(two.sum(1), 2)
        np.testing.assert_array_equal(np.take_along_axis(two, classes, axis=1), 1)
        expected = np.minimum(digits[:, 0].astype(int) + digits[:, 1], 255)  # the authors' clipped sum
        np.testing.assert_array_equal(merged, expected)
        for b in range(32):
            for k in range(2):
                canvas = digits[b, k, ..., 0]
                ys, xs = np.nonzero(canvas)
                top, left = ys.min(), xs.min()  # the marker pixel is the digit's top-left corner
                assert 0 <= top <= 8 and 0 <= left <= 8  # centred (4, 4) +- 4
                crop = canvas[top : top + 28, left : left + 28]
                assert canvas.sum() == crop.sum()  # nothing else on the canvas
                same = (images[..., 0] == crop).all((1, 2))
                assert same.any() and (labels[same] == classes[b, k]).all()


def test_merge_rules_on_hand_made_digits():
    a = np.array([[0, 100, 200, 255]], np.uint8)
    b = np.array([[50, 100, 100, 1]], np.uint8)
    np.testing.assert_array_equal(merge_digits(a, b, "sum"), [[50, 200, 255, 255]])  # min(a + b, 255)
    np.testing.assert_array_equal(merge_digits(a, b, "max"), [[50, 100, 200, 255]])
    with pytest.raises(ValueError, match="merge"):
        merge_digits(a, b, "mean")
    images, labels = _marked(40)
    images[:, 5:8, 5:8, 0] = 200  # a blob that overlaps itself under any two shifts of up to 2 px
    for merge in ("sum", "max"):
        batch = next(datalib.multimnist_batches(images, labels, 8, seed=1, epoch=0, merge=merge, max_shift=2))
        rule = np.maximum if merge == "max" else (lambda x, y: np.minimum(x.astype(int) + y, 255))
        np.testing.assert_array_equal(batch["images"], rule(batch["digits"][:, 0], batch["digits"][:, 1]))
        assert batch["images"].max() == (255 if merge == "sum" else 200)


def test_place_digits_shifts_without_wrap_around():
    digit = np.zeros((1, 28, 28, 1), np.uint8)
    digit[0, :, 0, 0] = 9  # the left column
    digit[0, 27, :, 0] = 7  # the bottom row
    for dy, dx in [(0, 0), (4, -4), (-4, 4), (6, -6)]:
        canvas = place_digits(digit, np.array([[dy, dx]]), 36)[0, ..., 0]
        expected = np.zeros((44 + 12, 44 + 12), np.uint8)  # the digit on a wide board, then cut to the canvas
        expected[10 + dy : 38 + dy, 10 + dx : 38 + dx] = digit[0, ..., 0]
        np.testing.assert_array_equal(canvas, expected[6:42, 6:42])
    # shifted 6 px left, the left column falls off the 36 x 36 canvas (4 px of padding): dropped, not wrapped
    assert (place_digits(digit, np.array([[0, -6]]), 36)[0, ..., 0] == 9).sum() == 0
    assert (place_digits(digit, np.array([[0, -4]]), 36)[0, ..., 0] == 9).sum() == 27


def test_each_digit_is_a_base_once_per_epoch_and_shifts_span_the_range():
    images, labels = _marked(64)
    bases, tops, lefts = [], [], []
    for batch in datalib.multimnist_batches(images, labels, 16, seed=3, epoch=0, drop_remainder=False):
        for canvas in batch["digits"]:
            for k in range(2):
                value, top, left = _where(canvas[k])
                tops.append(top), lefts.append(left)
                if k == 0:
                    bases.append(value - 1)
    np.testing.assert_array_equal(np.sort(bases), np.arange(64))
    assert set(tops) == set(lefts) == set(range(9))  # 4 +- 4


@pytest.mark.parametrize("per_base_shift", [True, False])
def test_per_base_shift_is_drawn_once_per_base_digit(per_base_shift):
    images, labels = _marked(50)
    where = {}  # base digit -> its (top, left) in each epoch
    for epoch in range(4):
        for batch in datalib.multimnist_batches(
            images, labels, 10, seed=5, epoch=epoch, per_base_shift=per_base_shift
        ):
            for canvas in batch["digits"][:, 0]:
                value, top, left = _where(canvas)
                where.setdefault(value, []).append((top, left))
    same = [len(set(places)) == 1 for places in where.values()]
    assert len(same) == 50 and (all(same) if per_base_shift else not any(same))
    # the fixed set: 200 pairs over 50 digits make each digit the base of 4 pairs
    pairs = multimnist_pairs(images, labels, 200, seed=0, per_base_shift=per_base_shift)
    places = {}
    for canvas in pairs["digits"][:, 0]:
        value, top, left = _where(canvas)
        places.setdefault(value, set()).add((top, left))
    assert len(places) == 50
    assert all(len(p) == 1 for p in places.values()) == per_base_shift


def test_batches_are_a_pure_function_of_seed_epoch_and_batch():
    images, labels = datalib.load_synthetic(100, seed=1)
    first = list(datalib.multimnist_batches(images, labels, 10, seed=0, epoch=2))
    again = list(datalib.multimnist_batches(images, labels, 10, seed=0, epoch=2))
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other_epoch = next(datalib.multimnist_batches(images, labels, 10, seed=0, epoch=3))
    other_seed = next(datalib.multimnist_batches(images, labels, 10, seed=1, epoch=2))
    assert not np.array_equal(other_epoch["images"], first[0]["images"])
    assert not np.array_equal(other_seed["images"], first[0]["images"])
    # two processes: each composes its slice of the same global batch
    halves = [
        list(datalib.multimnist_batches(images, labels, 10, seed=0, epoch=2, process_index=i, process_count=2))
        for i in range(2)
    ]
    for step, batch in enumerate(first):
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key])


def test_fixed_set_is_identical_across_calls_and_process_splits():
    images, labels = datalib.load_synthetic(300, seed=2)
    a = multimnist_pairs(images, labels, 500, seed=7)
    b = multimnist_pairs(images, labels, 500, seed=7)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert len(a["images"]) == 500 and (a["classes"][:, 0] != a["classes"][:, 1]).all()
    assert not np.array_equal(multimnist_pairs(images, labels, 500, seed=8)["images"], a["images"])
    smaller = multimnist_pairs(images, labels, 120, seed=7)  # a smaller set is the start of a larger one
    for key in a:
        np.testing.assert_array_equal(smaller[key], a[key][:120])
    # the first bases run through every digit once
    first_bases = {_where(c)[0] for c in multimnist_pairs(*_marked(30), 30, seed=1)["digits"][:, 0]}
    assert first_bases == set(range(1, 31))
    # evaluation's per-process slices of the set put back together are the set
    arrays = (a["images"], a["classes"], a["digits"])
    for count in (2, 3):
        parts = [
            list(datalib.padded_batches(arrays, 60, process_index=i, process_count=count)) for i in range(count)
        ]
        for step in range(len(parts[0])):
            mask = np.concatenate([p[step][0] for p in parts])
            images_step = np.concatenate([p[step][1] for p in parts])[mask == 1]
            np.testing.assert_array_equal(images_step, a["images"][step * 60 : step * 60 + 60])


def test_the_mnist_test_set_is_pinned(mnist_dir):
    """The 10,000 test pairs everyone scores: a change to generation or to NumPy's streams shows up here."""
    images, labels = datalib.load("mnist", "test", mnist_dir)
    pairs = multimnist_pairs(images, labels, 10_000, seed=0)
    digest = hashlib.sha256()
    for key in ("images", "classes", "digits"):
        digest.update(np.ascontiguousarray(pairs[key]).tobytes())
    assert digest.hexdigest() == "78cbc1a5a97ada7a043d3895953a234097252f2407582979bab02ab2734b0f73"


def test_generation_rejects_bad_input():
    images, labels = datalib.load_synthetic(20)
    with pytest.raises(ValueError, match="canvas"):
        next(datalib.multimnist_batches(images, labels, 4, seed=0, epoch=0, canvas=24))
    with pytest.raises(ValueError, match="two classes"):
        next(datalib.multimnist_batches(images, np.zeros_like(labels), 4, seed=0, epoch=0))
    with pytest.raises(ValueError, match="merge"):
        multimnist_pairs(images, labels, 4, seed=0, merge="avg")
    with pytest.raises(ValueError, match="uint8"):
        multimnist_pairs(images.astype(np.float32), labels, 4, seed=0)


def test_two_hot():
    np.testing.assert_array_equal(datalib.two_hot(np.array([[1, 3], [0, 2]]), 4), [[0, 1, 0, 1], [1, 0, 1, 0]])


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def test_exact_set_and_almost_scoring_on_hand_made_cases():
    lengths = np.array(
        [
            [0.1, 0.9, 0.1, 0.8, 0, 0],  # predicts {1, 3}
            [0.1, 0.9, 0.1, 0.8, 0, 0],  # same prediction
            [0.1, 0.9, 0.1, 0.8, 0, 0],  # same prediction
            [0.7, 0.7, 0.7, 0.0, 0, 0],  # a three-way tie: the lower indices, {0, 1}
        ],
        np.float32,
    )
    classes = np.array([[3, 1], [1, 4], [2, 5], [1, 0]])  # swapped order: correct; one right; none right; tie: correct
    predicted = np.asarray(scoring.top_k_classes(lengths, 2))
    np.testing.assert_array_equal(predicted, [[1, 3], [1, 3], [1, 3], [0, 1]])
    correct, almost = map(np.asarray, scoring.exact_and_almost(predicted, classes))
    np.testing.assert_array_equal(correct, [True, False, False, True])
    np.testing.assert_array_equal(almost, [True, True, False, True])
    np.testing.assert_array_equal(scoring.set_hits(predicted, classes), [2, 1, 0, 2])
    # the tie decided the other way would have been wrong
    assert not bool(scoring.exact_and_almost(np.array([[1, 2]]), np.array([[1, 0]]))[0][0])
    with pytest.raises(ValueError, match="k must"):
        scoring.top_k_classes(lengths, 7)


def test_pair_confusion_counts_each_true_digit_once():
    predicted = np.array([[1, 3], [1, 3], [3, 1], [0, 1], [5, 2]])
    classes = np.array([[3, 1], [1, 4], [2, 5], [1, 0], [2, 5]])
    weight = np.array([1, 1, 1, 1, 0])  # the last one is padding
    table = np.asarray(scoring.pair_confusion(predicted, classes, 6, weight))
    expected = np.zeros((6, 6), int)
    expected[3, 3] += 1; expected[1, 1] += 1  # noqa: E702 - the correct set in swapped order
    expected[1, 1] += 1; expected[4, 3] += 1  # noqa: E702 - one right: 4 taken for the unmatched 3
    expected[2, 1] += 1; expected[5, 3] += 1  # noqa: E702 - none right: unmatched pairs in ascending order
    expected[1, 1] += 1; expected[0, 0] += 1  # noqa: E702
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_array_equal(table.sum(1), [1, 3, 1, 1, 1, 1])  # each true digit counted once
    one = np.asarray(scoring.pair_confusion(np.array([[2], [0]]), np.array([[2], [1]]), 3, np.array([1, 1])))
    np.testing.assert_array_equal(one, [[0, 0, 0], [1, 0, 0], [0, 0, 1]])  # k = 1: the usual confusion matrix


def test_top_k_mask_and_khot_scoring_agree_with_top_k():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, (200, 6)).astype(np.float32)  # many ties
    classes = np.stack([rng.choice(6, 2, replace=False) for _ in range(200)])
    targets = datalib.two_hot(classes, 6)
    chosen = np.asarray(scoring.top_k_mask(scores, np.full(200, 2)))
    top = np.asarray(scoring.top_k_classes(scores, 2))
    np.testing.assert_array_equal(chosen, np.eye(6, dtype=bool)[top].any(axis=1))
    exact, almost = map(np.asarray, scoring.khot_exact_and_almost(scores, targets))
    exact_ref, almost_ref = map(np.asarray, scoring.exact_and_almost(top, classes))
    np.testing.assert_array_equal(exact, exact_ref)
    np.testing.assert_array_equal(almost, almost_ref)
    assert 0 < exact.sum() < almost.sum() < 200


# ---------------------------------------------------------------------------------------------------------------------
# The model and the loss with two targets
# ---------------------------------------------------------------------------------------------------------------------

TINY2 = dict(
    image_shape=(36, 36, 1), num_targets=2, conv1_channels=8, primary_maps=4, primary_dim=4, class_dim=8,
    decoder_hidden=(16, 32),
)  # fmt: skip


def _pairs(n=6, seed=0):
    images, labels = datalib.load_synthetic(60, seed=seed)
    return datalib.pair_arrays(multimnist_pairs(images, labels, n, seed=seed))  # images, two-hot labels, digits


def test_two_reconstruction_loss_against_numpy():
    import jax.numpy as jnp
    from flax import nnx

    from capsjax.config import LossConfig, ModelConfig
    from capsjax.model import CapsNet

    model = CapsNet(ModelConfig(**TINY2, kernels="textbook"), rngs=nnx.Rngs(0))
    call, decode = nnx.jit(lambda m, *a: m(*a)), nnx.jit(lambda m, c: m.decoder(c))
    images, labels, digits = _pairs()
    x, d = jnp.asarray(images / 255.0, jnp.float32), digits.astype(np.float64) / 255.0
    out = call(model, x, jnp.asarray(labels))
    assert out.reconstructions.shape == (6, 2, 36, 36, 1)
    terms = jax_to_np(model.per_example_losses(out, jnp.asarray(d, jnp.float32), jnp.asarray(labels), LossConfig()))

    lengths, capsules = np.asarray(out.lengths, np.float64), np.asarray(out.capsules)
    margin = np.sum(
        labels * np.maximum(0, 0.9 - lengths) ** 2 + 0.5 * (1 - labels) * np.maximum(0, lengths - 0.1) ** 2, axis=1
    )
    classes = np.sort(np.argsort(-labels, axis=1, kind="stable")[:, :2], axis=1)  # ascending, as the digits
    sse = np.zeros(6)
    for j in range(2):
        keep = (np.arange(10) == classes[:, j : j + 1])[..., None]  # mask by one true label
        recon = np.asarray(decode(model, jnp.asarray(capsules * keep)), np.float64)
        np.testing.assert_allclose(np.asarray(out.reconstructions[:, j]), recon, atol=1e-6)
        sse += np.sum((recon - d[:, j]) ** 2, axis=(1, 2, 3))  # each against its own digit
    np.testing.assert_allclose(terms["margin_loss"], margin, rtol=1e-5)
    np.testing.assert_allclose(terms["recon_loss"], sse, rtol=1e-4)
    np.testing.assert_allclose(terms["loss"], margin + 0.0005 * sse, rtol=1e-5)
    # at inference the two longest capsules choose the reconstructions, in ascending class order
    inferred = call(model, x)
    top = np.sort(np.argsort(-lengths, axis=1, kind="stable")[:, :2], axis=1)
    for j in range(2):
        keep = (np.arange(10) == top[:, j : j + 1])[..., None]
        recon = np.asarray(decode(model, jnp.asarray(capsules * keep)))
        np.testing.assert_allclose(np.asarray(inferred.reconstructions[:, j]), recon, atol=1e-6)
    with pytest.raises(ValueError, match="do not match"):  # the merged image is not a target of two reconstructions
        model.per_example_losses(out, x, jnp.asarray(labels), LossConfig())


def jax_to_np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


@pytest.mark.slow
def test_two_target_steps_train_and_score():
    import jax

    from capsjax.config import ModelConfig, OptimConfig
    from capsjax.evaluate import evaluate_arrays
    from capsjax.steps import init_state, make_steps

    graphdef, state = init_state(ModelConfig(**TINY2), OptimConfig(), seed=0)
    steps = make_steps(graphdef, OptimConfig(), num_targets=2)
    images, labels, digits = _pairs(8)
    state, metrics = steps.train(state, images, labels, digits)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= metrics["almost_accuracy"] <= 1
    images, labels, digits = _pairs(10, seed=1)  # 10 pairs in batches of 4: the last one padded
    result = evaluate_arrays(steps, state.params, images, labels, 4, digits=digits)
    assert result["count"] == 10 and np.asarray(result["confusion"]).sum() == 20  # each true digit once
    assert 0 <= result["accuracy"] <= result["almost_accuracy"] <= 1
    assert result["error_rate"] == pytest.approx(1 - result["accuracy"])
    out = jax.device_get(steps.predict(state.params, images[:8]))
    predicted = np.asarray(scoring.top_k_classes(out.lengths, 2))
    exact = np.asarray(scoring.exact_and_almost(predicted, np.asarray(scoring.top_k_classes(labels[:8], 2)))[0])
    first8 = evaluate_arrays(steps, state.params, images[:8], labels[:8], 4, digits=digits[:8])
    assert first8["accuracy"] == pytest.approx(exact.mean())


def test_multimnist_weights_file_scores_pairs_like_its_parameters(tmp_path):
    # A weights file of a MultiMNIST run loaded with the one-target steps: scoring pairs failed with a jit argument
    # error instead of a result.
    import dataclasses

    from capsjax import weights
    from capsjax.config import ConfigError, ModelConfig, OptimConfig, get_config
    from capsjax.evaluate import evaluate_arrays, load_run
    from capsjax.steps import init_state, make_steps

    config = dataclasses.replace(get_config("multimnist"), model=ModelConfig(**TINY2))
    graphdef, state = init_state(config.model, OptimConfig(), seed=0)
    path = weights.save_weights(tmp_path / "w.safetensors", state.params, config, step=1, dtype="float32")
    images, labels, digits = _pairs(10, seed=1)
    run = load_run(path)
    direct = evaluate_arrays(make_steps(graphdef, OptimConfig(), num_targets=2), state.params, images, labels, 4,
                             digits=digits)  # fmt: skip
    from_file = evaluate_arrays(run.steps, run.params, images, labels, 4, digits=digits)
    assert from_file["accuracy"] == direct["accuracy"] and from_file["loss"] == pytest.approx(direct["loss"])
    with pytest.raises(ConfigError, match="one set of parameters"):
        load_run(path, "latest")


# ---------------------------------------------------------------------------------------------------------------------
# Training, resuming and evaluating through the trainer and the CLIs
# ---------------------------------------------------------------------------------------------------------------------

_TINY_RUN = {  # the multimnist preset on a few real digits with a tiny model: seconds per epoch
    "train_examples": "128", "validation_examples": "32", "multimnist.validation_pairs": "32",
    "multimnist.test_pairs": "40", "batch_size": "32", "eval_batch_size": "32", "log_every_steps": "2",
    "checkpoint_every_steps": "2", "safe_checkpoint_margin": "4", "model.conv1_channels": "8",
    "model.primary_maps": "4", "model.primary_dim": "4", "model.class_dim": "8", "model.decoder_hidden": "16,32",
    "tensorboard": "false",
}  # fmt: skip


def test_multimnist_preset_and_config_checks():
    from capsjax.config import ConfigError, get_config, replace_path

    config = get_config("multimnist")
    assert config.dataset == "multimnist" and config.model.num_targets == 2 and config.max_shift == 0
    assert config.model.image_shape == (36, 36, 1) and config.model.num_primary_capsules == 3200  # 10 x 10 x 32
    assert config.optim.decay_steps == 10 * get_config("default").optim.decay_steps
    assert (config.multimnist.shift, config.multimnist.merge, config.multimnist.test_pairs) == (4, "sum", 10_000)
    baseline = get_config("multimnist_baseline")
    assert baseline.model.arch == "cnn" and dataclasses.replace(baseline.model, arch="capsnet") == config.model
    assert dataclasses.replace(baseline, model=config.model) == config  # trained and scored the same way
    with pytest.raises(ConfigError, match="max_shift=0"):
        replace_path(config, "max_shift", "2")
    with pytest.raises(ConfigError, match="num_targets=2"):
        replace_path(replace_path(get_config("default"), "max_shift", "0"), "dataset", "multimnist")
    with pytest.raises(ConfigError, match="merge"):
        replace_path(config, "multimnist.merge", "mean")


def test_multimnist_datasets(mnist_dir):
    from capsjax.config import get_config, replace_path
    from capsjax.data.splits import adapt_model_to_data, load_datasets

    config = replace_path(get_config("multimnist"), "data_dir", str(mnist_dir))
    for key, value in _TINY_RUN.items():
        config = replace_path(config, key, value)
    datasets = load_datasets(config)
    images, labels = datasets.train
    assert images.shape == (128, 28, 28, 1) and datasets.image_shape == (36, 36, 1)
    test_images, test_labels, test_digits = datasets.test
    assert test_images.shape == (40, 36, 36, 1) and test_digits.shape == (40, 2, 36, 36, 1)
    assert datasets.validation[0].shape == (32, 36, 36, 1) and datasets.validation_name == "validation"
    # the test pairs are the first 40 of the full 10,000-pair set everyone scores
    full = datalib.pair_arrays(multimnist_pairs(*datalib.load("mnist", "test", mnist_dir), 10_000, seed=0))
    np.testing.assert_array_equal(full[0][:40], test_images)
    # digits in ascending class order: digit j is the image of the j-th class of the two-hot label
    for merged, two, pair in zip(test_images, test_labels, test_digits):
        assert np.count_nonzero(two) == 2
        np.testing.assert_array_equal(merged, np.minimum(pair[0].astype(int) + pair[1], 255))
    epoch = list(datasets.train_batches(32, seed=0, epoch=3))
    assert len(epoch) == 4 and all(len(batch) == 3 for batch in epoch)
    again = list(datasets.train_batches(32, seed=0, epoch=3))
    np.testing.assert_array_equal(epoch[2][2], again[2][2])
    assert adapt_model_to_data(config, datasets) == config


def _tiny_config(mnist_dir, **overrides):
    from capsjax.config import get_config, replace_path

    config = replace_path(get_config("multimnist"), "data_dir", str(mnist_dir))
    for key, value in {**_TINY_RUN, "progress": "false", **overrides}.items():
        config = replace_path(config, key, value)
    return config


@pytest.mark.slow
def test_multimnist_resume_continues_exactly(tmp_path, mnist_dir):
    import jax

    from capsjax.evaluate import load_run
    from capsjax.train import train_and_evaluate

    config = _tiny_config(mnist_dir, epochs="2")
    train_and_evaluate(config, tmp_path / "a")  # 4 steps per epoch, 8 in all
    train_and_evaluate(_tiny_config(mnist_dir, epochs="1"), tmp_path / "b")  # stopped after epoch 1 ...
    results = train_and_evaluate(config, tmp_path / "b")  # ... and resumed
    assert results["steps"] == 8 and results["examples_seen"] == 256
    assert 0 <= results["test_accuracy"] <= results["test_almost_accuracy"] <= 1
    a, b = (jax.device_get(load_run(tmp_path / r, "latest").params) for r in "ab")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_multimnist_cli_train_then_eval(tmp_path, mnist_dir):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    work = tmp_path / "multi"
    sets = [arg for key, value in _TINY_RUN.items() for arg in ("--set", f"{key}={value}")]
    train = [sys.executable, str(root / "train.py"), "--preset", "multimnist", "--data-dir", str(mnist_dir),
             "--workdir", str(work), "--epochs", "1", "--quiet", *sets]  # fmt: skip
    result = subprocess.run(train, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "digits as bases of new pairs" in result.stdout
    evaluate = [sys.executable, str(root / "eval.py"), "--workdir", str(work)]
    result = subprocess.run(evaluate, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "exact-set accuracy" in result.stdout and "almost-correct" in result.stdout, result.stdout
    metrics = json.loads((work / "eval_test.json").read_text())
    assert metrics["dataset"] == "multimnist" and metrics["count"] == 40
    assert np.asarray(metrics["confusion"]).sum() == 80 and metrics["accuracy"] <= metrics["almost_accuracy"]
    assert (work / "multimnist.png").stat().st_size > 5000


def test_fig5_overlay_and_figure(tmp_path):
    from capsjax import viz

    first, second = np.zeros((1, 4, 4, 1), np.float32), np.zeros((1, 4, 4, 1), np.float32)
    first[0, 0, 0], second[0, 0, 1], first[0, 1, 1], second[0, 1, 1] = 1.0, 1.0, 0.5, 0.5
    rgb = viz.overlay_pair(first, second)
    assert rgb.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(rgb[0, 0, 0], [1, 0, 0])  # the first digit red
    np.testing.assert_array_equal(rgb[0, 0, 1], [0, 1, 0])  # the second green
    np.testing.assert_array_equal(rgb[0, 1, 1], [0.5, 0.5, 0])  # both: yellow
    images, labels, digits = _pairs(3)
    recon = digits.astype(np.float32) / 255
    true = np.sort(np.argsort(-labels, axis=1, kind="stable")[:, :2], axis=1)
    groups = [
        {"title": "correct", "images": images, "reconstructions": recon, "labels": true, "shown": true},
        {"title": "wrong", "images": images[:0], "reconstructions": recon[:0], "labels": true[:0], "shown": true[:0]},
        {"title": "probe", "images": images[:2], "reconstructions": recon[:2], "labels": true[:2], "shown": true[:2],
         "prefix": "R*"},
    ]  # fmt: skip
    path = viz.plot_multidigit(groups, tmp_path / "fig5.png")
    assert path.stat().st_size > 2000
    with pytest.raises(ValueError, match="non-empty"):
        viz.plot_multidigit(groups[1:2], tmp_path / "none.png")
    with pytest.raises(ValueError, match="one shape"):
        viz.overlay_pair(first, second[:, :2])
