"""On-device augmentation, run inside the jitted train step (pure ``jax.numpy``): the paper's random shifts, the
random placement on a larger canvas of expanded MNIST, random horizontal flips (for Fashion-MNIST) and the
Efficient-CapsNet authors' MNIST augmentation (rotation, shift inside the margins, squish, erase)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from capsjax.config import AUGMENTATIONS


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


# ---- the Efficient-CapsNet authors' MNIST augmentation (Mazzia et al. 2021, their released input pipeline): each
# training image is rotated (half of them), shifted inside its margins, squished and given an erased patch, in that
# order. The draws follow their distributions; the code is ours, in jnp, per batch.


def _half_normal_fraction(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``min(|N(0, 0.33)|, 0.9999)``: the fraction of a range the authors' pipeline draws for each amount."""
    return jnp.minimum(jnp.abs(0.33 * jax.random.normal(key, shape)), 0.9999)


def rotate_images(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotates each image about its centre by its own angle (degrees, counter-clockwise as displayed with rows going
    down, as ``np.rot90`` for 90), bilinear, zeros outside. ``images`` float ``[B, H, W, C]``, ``degrees`` ``[B]``."""
    _, h, w, c = images.shape
    theta = jnp.deg2rad(degrees)[:, None, None]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
    # the source of each output pixel: the output position turned back by theta (rows point down on screen, so a
    # counter-clockwise turn as displayed maps the source (y, x) to (cos y - sin x, sin y + cos x))
    src_y = cy + jnp.cos(theta) * y[None] + jnp.sin(theta) * x[None]
    src_x = cx - jnp.sin(theta) * y[None] + jnp.cos(theta) * x[None]

    def one(image, sy, sx):  # [H, W, C], [H, W], [H, W]
        sample = lambda channel: jax.scipy.ndimage.map_coordinates(channel, [sy, sx], order=1, cval=0.0)  # noqa: E731
        return jnp.stack([sample(image[..., k]) for k in range(c)], axis=-1)

    return jax.vmap(one)(images, src_y, src_x)


def random_rotation(key: jax.Array, images: jax.Array, max_degrees: float = 30.0, probability: float = 0.5):
    """Half the images (``probability``) rotated by ``trunc(max_degrees * clip(N(0, 0.33), -0.9999, 0.9999))``
    whole degrees (about ±10° typical, under 30°), as the authors' pipeline draws them."""
    key_angle, key_coin = jax.random.split(key)
    n = images.shape[0]
    degrees = jnp.trunc(max_degrees * jnp.clip(0.33 * jax.random.normal(key_angle, (n,)), -0.9999, 0.9999))
    degrees = jnp.where(jax.random.bernoulli(key_coin, probability, (n,)), degrees, 0.0)
    return rotate_images(images, degrees)


def random_margin_shift(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image moved up or down and left or right (each direction with probability 1/2) by
    ``floor(f * margin)`` pixels, ``f = min(|N(0, 0.33)|, 0.9999)`` per axis, where the margin is the count of empty
    rows or columns on that side (plus one towards the bottom and right, as drawn by the authors): the ink never
    leaves the image. An image without ink stays."""
    _, h, w, _ = images.shape
    key_amount, key_direction = jax.random.split(key)
    n = images.shape[0]
    amount = _half_normal_fraction(key_amount, (n, 2))
    towards_end = jax.random.bernoulli(key_direction, 0.5, (n, 2))
    ink = images.sum(axis=-1) > 0  # [B, H, W]
    offsets = []
    for axis, size in ((1, h), (2, w)):  # rows (dy), then columns (dx)
        filled = ink.any(axis=3 - axis)  # [B, size]: which rows / columns hold ink
        index = jnp.arange(size)
        first = jnp.min(jnp.where(filled, index, size), axis=1).astype(jnp.float32)
        last = jnp.max(jnp.where(filled, index, -1), axis=1).astype(jnp.float32)
        k = axis - 1
        back = jnp.floor(-amount[:, k] * first)  # towards the top / left, up to the empty rows there
        forward = jnp.floor(amount[:, k] * (size - last))  # towards the bottom / right: floor(f * (1 + margin))
        move = jnp.where(towards_end[:, k], forward, back)
        offsets.append(jnp.where(filled.any(axis=1), move, 0.0).astype(jnp.int32))
    return shift_images(images, jnp.stack(offsets, axis=1))


def random_squish(key: jax.Array, images: jax.Array) -> jax.Array:
    """Each image narrowed by ``m = floor(f * W / 4) + 1`` columns (1..7 on 28x28; ``f = min(|N(0, 0.33)|,
    0.9999)``) with a Lanczos-3 antialiased resize, and placed ``m // 2`` or ``m // 2 + 1`` columns from the left
    (each with probability 1/2); the rest is black. Clipped to [0, 1] (Lanczos overshoots)."""
    _, h, w, c = images.shape
    n = images.shape[0]
    amount = _half_normal_fraction(key, (n, 2))
    narrower = jnp.floor(amount[:, 0] * (w / 4)) + 1
    offset = jnp.floor(narrower / 2) + jnp.floor(amount[:, 1] * 2)

    def one(image, scale, shift):
        return jax.image.scale_and_translate(
            image, (h, w, c), (1,), scale[None], shift[None], method="lanczos3", antialias=True
        )

    squished = jax.vmap(one)(images.astype(jnp.float32), (w - narrower) / w, offset)
    return jnp.clip(squished, 0.0, 1.0).astype(images.dtype)


def random_erase(key: jax.Array, images: jax.Array, size: int = 4, border: int = 4) -> jax.Array:
    """Each image with a ``size`` x ``size`` black patch whose top-left corner is uniform over rows and columns
    ``border`` .. ``H - size - 2`` (4..22 on 28x28, as the authors draw it)."""
    n, h, w, _ = images.shape
    key_y, key_x = jax.random.split(key)
    top = jax.random.randint(key_y, (n, 1), border, h - size - 1)
    left = jax.random.randint(key_x, (n, 1), border, w - size - 1)
    rows, cols = jnp.arange(h)[None, :], jnp.arange(w)[None, :]
    in_rows = (rows >= top) & (rows < top + size)  # [B, H]
    in_cols = (cols >= left) & (cols < left + size)  # [B, W]
    patch = in_rows[:, :, None, None] & in_cols[:, None, :, None]
    return jnp.where(patch, jnp.zeros((), images.dtype), images)


def efficient_capsnet_augmentation(key: jax.Array, images: jax.Array) -> jax.Array:
    """The Efficient-CapsNet authors' MNIST augmentation: :func:`random_rotation`, :func:`random_margin_shift`,
    :func:`random_squish`, :func:`random_erase`, in that order, each with its own key. Float images in [0, 1]."""
    keys = jax.random.split(key, 4)
    images = random_rotation(keys[0], images)
    images = random_margin_shift(keys[1], images)
    images = random_squish(keys[2], images)
    return random_erase(keys[3], images)


def train_augmentation(
    max_shift: int = 0, canvas_size: int = 0, horizontal_flip: bool = False, augmentation: str = "shift"
):
    """The train step's ``augment(key, images)`` for a config: :func:`random_placement` on a ``canvas_size`` canvas
    (expanded MNIST), else :func:`random_shift` by up to ``max_shift`` pixels, or with ``augmentation=
    "efficient_capsnet"`` :func:`efficient_capsnet_augmentation`; then with ``horizontal_flip`` :func:`random_flip`
    (its key folded from the step key, so the shifts are those of the same run without flips); None when there is
    nothing to do."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {augmentation!r}")
    if canvas_size and max_shift:
        raise ValueError("the random placement on a canvas replaces the random shifts: set max_shift=0")
    if augmentation != "shift" and (canvas_size or max_shift):
        raise ValueError(f"augmentation {augmentation!r} moves the digits itself: set max_shift=0 and canvas_size=0")
    if augmentation == "efficient_capsnet":
        move = efficient_capsnet_augmentation
    elif canvas_size:
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
