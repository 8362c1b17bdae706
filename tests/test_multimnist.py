"""MultiMNIST (paper section 6): pair generation, the fixed test set, set scoring, the two-reconstruction loss,
and an end-to-end run through both CLIs."""

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
    assert digest.hexdigest() == "0672b6fb36ce90975a43e4b814e0eaf2c09912822f565090a708806c92a68c83"


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
