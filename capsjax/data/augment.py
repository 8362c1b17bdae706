"""On-device augmentation, run inside the jitted train step (pure ``jax.numpy``): the paper's random shifts, the
random placement on a larger canvas of expanded MNIST, and random horizontal flips (for Fashion-MNIST)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_images(images: jax.Array, offsets: jax.Array) -> jax.Array:
    """Translates each image by its own integer offset, filling the vacated area with zeros.

    ``out[b, y, x] = images[b, y - dy_b, x - dx_b]`` where that is inside the image, else 0 (like ``np.roll`` without
    the wrap-around): positive ``dy`` moves content down, positive ``dx`` right. Pure ``jnp`` (two gathers along the
    image axes and a mask); jit-able, and shards along the batch under any mesh.

    Args:
      images: ``[B, H, W, C]``, any dtype.
      offsets: integer ``[B, 2]`` of ``(dy, dx)``.

    Returns:
      ``[B, H, W, C]`` in ``images``' dtype.
    """
    _, h, w, _ = images.shape
    offsets = jnp.asarray(offsets, jnp.int32)
    rows = jnp.arange(h, dtype=jnp.int32)[None, :] - offsets[:, 0:1]  # [B, H]: the source row of each output row
    cols = jnp.arange(w, dtype=jnp.int32)[None, :] - offsets[:, 1:2]  # [B, W]
    out = jnp.take_along_axis(images, jnp.clip(rows, 0, h - 1)[:, :, None, None], axis=1, mode="clip")
    out = jnp.take_along_axis(out, jnp.clip(cols, 0, w - 1)[:, None, :, None], axis=2, mode="clip")
    inside = ((rows >= 0) & (rows < h))[:, :, None, None] & ((cols >= 0) & (cols < w))[:, None, :, None]
    return jnp.where(inside, out, jnp.zeros((), images.dtype))


def random_shift(key: jax.Array, images: jax.Array, max_shift: int = 2) -> jax.Array:
    """The paper's augmentation: each image shifted by its own ``(dy, dx)``, uniform in ``[-max_shift, max_shift]``,
    zero padded (content moved out is lost).

    Args:
      key: a JAX PRNG key.
      images: ``[B, H, W, C]``, any dtype.
      max_shift: a static Python int; 0 returns ``images`` unchanged.

    Returns:
      ``[B, H, W, C]`` in ``images``' dtype.
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if max_shift == 0:
        return images
    offsets = jax.random.randint(key, (images.shape[0], 2), -max_shift, max_shift + 1, dtype=jnp.int32)
    return shift_images(images, offsets)


def place_images(images: jax.Array, offsets: jax.Array, canvas_size: int) -> jax.Array:
    """Puts each image on a black ``canvas_size x canvas_size`` canvas with its top-left corner at its own
    ``(dy, dx)`` (expanded MNIST). Offsets must lie in ``[0, canvas_size - H]`` x ``[0, canvas_size - W]``: then
    nothing is cut off and the pixel sum is kept.

    Args:
      images: ``[B, H, W, C]``, any dtype.
      offsets: integer ``[B, 2]`` of ``(dy, dx)``.
      canvas_size: a static Python int, at least ``H`` and ``W``.

    Returns:
      ``[B, canvas_size, canvas_size, C]`` in ``images``' dtype.
    """
    _, h, w, _ = images.shape
    if canvas_size < max(h, w):
        raise ValueError(f"a {canvas_size}x{canvas_size} canvas cannot hold {h}x{w} images")
    padded = jnp.pad(images, ((0, 0), (0, canvas_size - h), (0, canvas_size - w), (0, 0)))
    return shift_images(padded, offsets)


def random_placement(key: jax.Array, images: jax.Array, canvas_size: int) -> jax.Array:
    """Expanded MNIST's augmentation: each image placed on a black ``canvas_size`` canvas at its own offset, uniform
    over every position where it fits whole (28x28 digits on 40x40: 13 x 13 positions). See :func:`place_images`."""
    n, h, w, _ = images.shape
    if canvas_size < max(h, w):
        raise ValueError(f"a {canvas_size}x{canvas_size} canvas cannot hold {h}x{w} images")
    key_y, key_x = jax.random.split(key)
    dy = jax.random.randint(key_y, (n,), 0, canvas_size - h + 1, dtype=jnp.int32)
    dx = jax.random.randint(key_x, (n,), 0, canvas_size - w + 1, dtype=jnp.int32)
    return place_images(images, jnp.stack([dy, dx], axis=1), canvas_size)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image mirrored left-right with probability 1/2, its own coin (for clothes, not for digits).

    Args:
      key: a JAX PRNG key.
      images: ``[B, H, W, C]``, any dtype.

    Returns:
      ``[B, H, W, C]`` in ``images``' dtype.
    """
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def train_augmentation(max_shift: int = 0, canvas_size: int = 0, horizontal_flip: bool = False):
    """The train step's ``augment(key, images)`` for a config: :func:`random_placement` on a ``canvas_size`` canvas
    (expanded MNIST), else :func:`random_shift` by up to ``max_shift`` pixels, then with ``horizontal_flip``
    :func:`random_flip` (its key folded from the step key, so the shifts are those of the same run without flips);
    None when there is nothing to do."""
    if canvas_size and max_shift:
        raise ValueError("the random placement on a canvas replaces the random shifts: set max_shift=0")
    if canvas_size:
        move = lambda key, images: random_placement(key, images, canvas_size)  # noqa: E731
    elif max_shift:
        move = lambda key, images: random_shift(key, images, max_shift)  # noqa: E731
    else:
        move = None
    if not horizontal_flip:
        return move

    def augment(key, images):
        if move is not None:
            images = move(key, images)
        return random_flip(jax.random.fold_in(key, 1), images)

    return augment
