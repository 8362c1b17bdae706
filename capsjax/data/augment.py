"""On-device augmentation: the paper's random shifts, run inside the jitted train step (pure ``jax.numpy``)."""

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
