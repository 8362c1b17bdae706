"""The host pipeline (batches, evaluation's padded batches, per-process slicing, prefetch), the on-device random
shift (MultiMNIST: tests/test_multimnist.py)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from capsjax import data as datalib
from capsjax.steps import to_unit_float

# ---------------------------------------------------------------------------------------------------------------------
# Batching and prefetching
# ---------------------------------------------------------------------------------------------------------------------


def _indexed(n):
    """Images whose first pixel is their index (mod 256) and labels equal to their index."""
    images = np.zeros((n, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    return images, np.arange(n, dtype=np.int32)


def test_batches_cover_each_example_once_and_order_depends_on_seed_and_epoch():
    images, labels = _indexed(103)
    seen = [y for _, y in datalib.batches(images, labels, 10, seed=1, epoch=0, drop_remainder=False)]
    assert [len(s) for s in seen] == [10] * 10 + [3]
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.arange(103))
    assert not np.array_equal(order, np.arange(103))
    np.testing.assert_array_equal(order, np.random.default_rng([1, 0]).permutation(103))
    for x, y in datalib.batches(images, labels, 10, seed=1, epoch=0):
        assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape == (10, 4, 4, 1)
        np.testing.assert_array_equal(x[:, 0, 0, 0], y % 256)
    again = np.concatenate([y for _, y in datalib.batches(images, labels, 10, seed=1, epoch=0, drop_remainder=False)])
    other_epoch = np.concatenate([y for _, y in datalib.batches(images, labels, 10, seed=1, epoch=1)])
    other_seed = np.concatenate([y for _, y in datalib.batches(images, labels, 10, seed=2, epoch=0)])
    np.testing.assert_array_equal(again, order)
    assert not np.array_equal(other_epoch, order[:100]) and not np.array_equal(other_seed, order[:100])
    assert len(list(datalib.batches(images, labels, 10, seed=1, epoch=0))) == 10 == datalib.num_batches(103, 10)
    assert datalib.num_batches(103, 10, drop_remainder=False) == 11
    unshuffled = np.concatenate([y for _, y in datalib.batches(images, labels, 10, seed=1, epoch=0, shuffle=False)])
    np.testing.assert_array_equal(unshuffled, np.arange(100))


@pytest.mark.parametrize("count", [2, 4])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_batches_per_process_slices_make_the_global_batch(count, drop_remainder):
    images, labels = _indexed(50)
    kwargs = {"seed": 0, "epoch": 3, "drop_remainder": drop_remainder}
    whole = list(datalib.batches(images, labels, 8, process_index=0, process_count=1, **kwargs))
    parts = [
        list(datalib.batches(images, labels, 8, process_index=i, process_count=count, **kwargs)) for i in range(count)
    ]
    assert all(len(p) == len(whole) for p in parts)
    for step, (_, y) in enumerate(whole):
        local = [parts[i][step][1] for i in range(count)]
        if len(y) == 8:
            assert all(len(part) == 8 // count for part in local)
        np.testing.assert_array_equal(np.concatenate(local), y)


def test_batches_reject_bad_arguments():
    images, labels = _indexed(10)
    with pytest.raises(ValueError, match="multiple of process_count"):
        next(datalib.batches(images, labels, 6, seed=0, epoch=0, process_index=0, process_count=4))
    with pytest.raises(ValueError, match="labels"):
        next(datalib.batches(images, labels[:9], 2, seed=0, epoch=0))


def test_local_slice_splits_like_array_split():
    for length in range(0, 13):
        for count in (1, 2, 3, 4):
            rows = np.arange(length)
            parts = [rows[datalib.local_slice(length, i, count)] for i in range(count)]
            for got, expected in zip(parts, np.array_split(rows, count)):
                np.testing.assert_array_equal(got, expected)


def test_padded_batches_cover_every_example_once_in_order_then_zeros():
    images, labels = _indexed(21)
    out = list(datalib.padded_batches((images, labels), 8, process_index=0, process_count=1))
    assert len(out) == 3
    for mask, x, y in out:
        assert mask.dtype == np.int32 and x.dtype == np.uint8 and y.dtype == np.int32
        assert mask.shape == y.shape == (8,) and x.shape == (8, 4, 4, 1)
        assert not x[mask == 0].any() and not y[mask == 0].any()  # the padding is zeros
    masks = np.concatenate([m for m, _, _ in out])
    np.testing.assert_array_equal(masks, [1] * 21 + [0] * 3)
    np.testing.assert_array_equal(np.concatenate([y for _, _, y in out])[:21], np.arange(21))
    np.testing.assert_array_equal(np.concatenate([x for _, x, _ in out])[:21, 0, 0, 0], np.arange(21))
    assert list(datalib.padded_batches((images[:0],), 8, process_index=0, process_count=1)) == []
    with pytest.raises(ValueError, match="different lengths"):
        next(datalib.padded_batches((images, labels[:5]), 8))
    with pytest.raises(ValueError, match="multiple of process_count"):
        next(datalib.padded_batches((images,), 6, process_index=0, process_count=4))


@pytest.mark.parametrize("count", [2, 4])
def test_training_and_evaluation_batches_share_the_per_process_slicing(count):
    """``count`` simulated processes: each gets a contiguous part of every global batch, the same part in training
    (batches) and in evaluation (padded_batches); the parts, in process order, make the global batch (so they are
    disjoint)."""
    images, labels = _indexed(64)
    bs = 16
    train = [
        [y for _, y in datalib.batches(images, labels, bs, seed=0, epoch=0, shuffle=False, process_index=i,
                                       process_count=count)]
        for i in range(count)
    ]  # fmt: skip
    evaluation = [
        [y for _, _, y in datalib.padded_batches((images, labels), bs, process_index=i, process_count=count)]
        for i in range(count)
    ]
    assert all(len(parts) == 64 // bs for parts in train + evaluation)
    for step in range(64 // bs):
        for parts in (train, evaluation):
            local = [parts[i][step] for i in range(count)]
            assert all(len(part) == bs // count for part in local)
            np.testing.assert_array_equal(np.concatenate(local), np.arange(step * bs, (step + 1) * bs))
        for i in range(count):
            np.testing.assert_array_equal(train[i][step], evaluation[i][step])


def test_padded_batches_last_batch_split_between_processes():
    images, labels = _indexed(21)
    parts = [list(datalib.padded_batches((labels,), 8, process_index=i, process_count=2)) for i in range(2)]
    last = [parts[i][-1] for i in range(2)]
    np.testing.assert_array_equal(last[0][1], [16, 17, 18, 19])
    np.testing.assert_array_equal(last[0][0], [1, 1, 1, 1])
    np.testing.assert_array_equal(last[1][1], [20, 0, 0, 0])
    np.testing.assert_array_equal(last[1][0], [1, 0, 0, 0])


def test_prefetch_to_device_keeps_order_and_values():
    images, labels = _indexed(40)
    host = list(datalib.batches(images, labels, 8, seed=0, epoch=0))
    out = list(datalib.prefetch_to_device(iter(host), size=2))
    assert len(out) == len(host)
    for (x, y), (dx, dy) in zip(host, out):
        assert isinstance(dx, jax.Array) and dx.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(dx), x)
        np.testing.assert_array_equal(np.asarray(dy), y)


def test_prefetch_to_device_with_a_sharding():
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    sharding = NamedSharding(mesh, P("data"))
    images, labels = _indexed(8 * len(devices) * 3)
    host = list(datalib.batches(images, labels, 8 * len(devices), seed=0, epoch=0))
    out = list(datalib.prefetch_to_device(iter(host), sharding=sharding))
    for (x, y), (dx, dy) in zip(host, out):
        assert dx.sharding.is_equivalent_to(sharding, 4) and dy.sharding.is_equivalent_to(sharding, 1)
        np.testing.assert_array_equal(np.asarray(dx), x)
        np.testing.assert_array_equal(np.asarray(dy), y)


def test_prefetch_to_device_raises_producer_errors_and_stops_early():
    def failing():
        yield np.zeros(3)
        raise RuntimeError("broken reader")

    stream = datalib.prefetch_to_device(failing())
    assert np.asarray(next(stream)).shape == (3,)
    with pytest.raises(RuntimeError, match="broken reader"):
        next(stream)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield np.full(2, i)
            i += 1

    stream = datalib.prefetch_to_device(endless(), size=2)
    assert int(next(stream)[0]) == 0
    stream.close()
    assert not any(t.name == "capsjax-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(produced) <= 5  # it ran at most `size` (+ the one in hand) ahead


# ---------------------------------------------------------------------------------------------------------------------
# On-device preprocessing
# ---------------------------------------------------------------------------------------------------------------------


def _numpy_shift(image, dy, dx):
    """np.roll, with what wraps around zeroed."""
    out = np.roll(image, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[dy:] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    return out


def test_shift_images_matches_numpy_reference():
    offsets = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)] + [(4, -3), (6, 0), (-7, 9)], np.int32)
    images = np.random.default_rng(0).integers(1, 256, (len(offsets), 6, 5, 2), dtype=np.uint8)
    got = np.asarray(jax.jit(datalib.shift_images)(images, offsets))
    assert got.dtype == np.uint8
    for image, out, (dy, dx) in zip(images, got, offsets):
        np.testing.assert_array_equal(out, _numpy_shift(image, dy, dx))
    # the doc's example: content moves down by dy and right by dx
    one = np.zeros((1, 5, 5, 1), np.float32)
    one[0, 2, 2, 0] = 1
    moved = np.asarray(datalib.shift_images(one, np.array([[1, -2]])))
    assert moved[0, 3, 0, 0] == 1 and moved.sum() == 1


def _centred_blob(batch=64, size=28):
    y, x = np.mgrid[0:size, 0:size] - (size - 1) / 2
    blob = np.where(np.hypot(y, x) <= size / 4, np.exp(-(y**2 + x**2) / 30), 0).astype(np.float32)
    return np.broadcast_to(blob[None, :, :, None], (batch, size, size, 1)).copy()


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_random_shift_properties(dtype):
    images = (_centred_blob() * (255 if dtype == np.uint8 else 1)).astype(dtype)
    shift = jax.jit(datalib.random_shift, static_argnums=2)
    a = shift(jax.random.key(0), images, 2)
    assert a.shape == images.shape and a.dtype == images.dtype
    np.testing.assert_array_equal(a, shift(jax.random.key(0), images, 2))  # same key, same shifts
    assert not np.array_equal(a, shift(jax.random.key(1), images, 2))  # other key, other shifts
    assert not np.array_equal(a, images)
    # the blob stays inside: every image keeps its pixel mass exactly (integer shifts move, never resample)
    np.testing.assert_allclose(np.asarray(a, np.float64).sum((1, 2, 3)), np.asarray(images, np.float64).sum((1, 2, 3)))
    assert len({np.asarray(img).tobytes() for img in a}) > 10  # each image has its own shift
    np.testing.assert_array_equal(datalib.random_shift(jax.random.key(0), images, 0), images)


def test_random_shift_offsets_are_uniform_over_the_square():
    n = 5000
    images = np.zeros((n, 9, 9, 1), np.float32)
    images[:, 4, 4, 0] = 1
    out = np.asarray(datalib.random_shift(jax.random.key(42), images, 2))
    flat = out[..., 0].reshape(n, -1)
    assert (flat.sum(1) == 1).all()
    ys, xs = np.divmod(flat.argmax(1), 9)
    counts = np.zeros((5, 5), int)
    np.add.at(counts, (ys - 4 + 2, xs - 4 + 2), 1)
    expected = n / 25
    assert counts.min() > expected - 5 * np.sqrt(expected) and counts.max() < expected + 5 * np.sqrt(expected), counts


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto])
def test_random_shift_sharded_equals_unsharded(axis_type):
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(axis_type,), devices=devices)
    images = np.random.default_rng(0).random((8 * len(devices), 28, 28, 1), np.float32)
    key = jax.random.key(5)
    expected = jax.jit(datalib.random_shift, static_argnums=2)(key, images, 2)
    sharded = jax.device_put(images, NamedSharding(mesh, P("data")))
    got = jax.jit(datalib.random_shift, static_argnums=2)(key, sharded, 2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_to_unit_float():
    """The step's conversion of the uint8 batches this pipeline delivers."""
    x = np.array([0, 1, 128, 255], np.uint8)
    y = to_unit_float(jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), x / 255.0, rtol=1e-6)
    assert float(y[-1]) == 1.0 and float(y[0]) == 0.0
    assert to_unit_float(jnp.asarray(np.array([0.5], np.float32))).dtype == jnp.float32
