"""Scoring images that hold ``k`` objects (MultiMNIST: two digits), as the authors' code scores them.

The prediction is the set of the ``k`` highest scores (capsule lengths, or a CNN's outputs); it is compared with the
set of true classes, order ignored. An example is *correct* when every true class is predicted (the paper's
MultiMNIST error is 100% minus this rate) and *almost correct* when at least one is. Ties between scores go to the
lower class index (``lax.top_k``'s rule, the same as ``argmax``). With ``k = 1`` both reduce to plain accuracy.

Pure ``jax.numpy`` functions (NumPy arrays welcome): the eval step sums them over devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def top_k_classes(scores: jax.Array, k: int) -> jax.Array:
    """The ``k`` highest-scoring classes, ``int32 [..., k]``, highest first (ties: the lower index first)."""
    scores = jnp.asarray(scores)
    if not 1 <= k <= scores.shape[-1]:
        raise ValueError(f"k must lie in [1, {scores.shape[-1]}], got {k}")
    return lax.top_k(scores, k)[1].astype(jnp.int32)


def set_hits(predicted: jax.Array, classes: jax.Array) -> jax.Array:
    """How many of the true ``classes`` ``int [..., k]`` (distinct) are among ``predicted`` ``int [..., k]``:
    ``int32 [...]``."""
    predicted, classes = jnp.asarray(predicted), jnp.asarray(classes)
    if predicted.shape != classes.shape:
        raise ValueError(f"predicted {predicted.shape} and classes {classes.shape} must have the same shape")
    found = jnp.any(classes[..., :, None] == predicted[..., None, :], axis=-1)  # [..., k]: true class j predicted
    return jnp.sum(found, axis=-1, dtype=jnp.int32)


def exact_and_almost(predicted: jax.Array, classes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(correct, almost)``, bool ``[...]``: every true class predicted; at least one true class predicted."""
    hits = set_hits(predicted, classes)
    return hits == classes.shape[-1], hits >= 1


def top_k_mask(scores: jax.Array, k: jax.Array) -> jax.Array:
    """bool ``[..., K]``: the ``k`` (``int [...]``, may differ per example) highest scores, ties to the lower index
    (the same choice as :func:`top_k_classes`, for a ``k`` known only at run time)."""
    scores = jnp.asarray(scores)
    above = scores[..., None, :] > scores[..., :, None]  # [..., i, j]: j beats i
    index = jnp.arange(scores.shape[-1])
    before = jnp.broadcast_to(index[None, :] < index[:, None], above.shape)  # j has the lower index
    tie_before = (scores[..., None, :] == scores[..., :, None]) & before
    rank = jnp.sum(above | tie_before, axis=-1)  # [..., K]: how many classes come before i
    return rank < jnp.asarray(k)[..., None]


def khot_exact_and_almost(scores: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`exact_and_almost` for k-hot ``targets`` ``[..., K]`` (k = the number of ones, per example) against
    the top k of ``scores`` ``[..., K]``."""
    wanted = jnp.asarray(targets) > 0.5
    k = jnp.sum(wanted, axis=-1)
    hits = jnp.sum(top_k_mask(scores, k) & wanted, axis=-1)
    return hits == k, hits >= 1


def pair_confusion(predicted: jax.Array, classes: jax.Array, num_classes: int, weight: jax.Array) -> jax.Array:
    """Per-digit confusion matrix ``int32 [num_classes, num_classes]`` (rows: true digit, columns: predicted digit).

    Every true digit of every example adds ``weight`` (``int [...]``, 0 for padding) to one cell: to its own diagonal
    cell if it is predicted; otherwise to the column of a predicted class that matches no true digit, the unmatched
    true and predicted classes paired in ascending order. So a row sums to the count of that digit, the diagonal over
    the row is the digit's recall, and with ``k = 1`` this is the usual confusion matrix.

    Args:
      predicted, classes: ``int [..., k]``, distinct classes within each example.
      num_classes: ``K``.
      weight: ``int [...]``.
    """
    predicted, classes = jnp.asarray(predicted, jnp.int32), jnp.asarray(classes, jnp.int32)
    true_found = jnp.any(classes[..., :, None] == predicted[..., None, :], axis=-1)  # [..., k]
    pred_found = jnp.any(predicted[..., :, None] == classes[..., None, :], axis=-1)
    # unmatched classes first, ascending; matched ones pushed to the end as num_classes
    true_rest = jnp.sort(jnp.where(true_found, num_classes, classes), axis=-1)
    pred_rest = jnp.sort(jnp.where(pred_found, num_classes, predicted), axis=-1)
    rows = jnp.concatenate([classes, true_rest], axis=-1).reshape(-1)  # [N * 2k]
    cols = jnp.concatenate([classes, pred_rest], axis=-1).reshape(-1)
    use = jnp.concatenate([true_found, true_rest < num_classes], axis=-1)
    w = jnp.where(use, jnp.asarray(weight, jnp.int32)[..., None], 0).reshape(-1)
    last = num_classes - 1
    table = jnp.zeros((num_classes, num_classes), jnp.int32)
    return table.at[jnp.minimum(rows, last), jnp.minimum(cols, last)].add(w)
