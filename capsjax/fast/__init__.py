"""XLA:CPU-tuned equivalents of the textbook functions, and host-memory tuning for CPU processes.

Each function here computes what a textbook function computes, tested equal in values and gradients, in a form that
XLA's CPU backend runs faster or in less memory:

- :func:`conv2d` (:mod:`capsjax.fast.conv`): the convolution as patches times the kernel, for
  ``lax.conv_general_dilated``;
- :func:`parent_major_predictions` and :func:`parent_major_routing` (:mod:`capsjax.fast.routing`): ``u_hat`` and
  routing by agreement in a parent-major layout, for ``capsjax.ops.capsule_predictions`` and
  ``capsjax.ops.dynamic_routing``;
- :mod:`capsjax.fast.hostmem`: huge pages and heap trimming for XLA's CPU runtime (imported on its own by the CLIs).

The layers choose between these and the textbook functions with one switch, ``ModelConfig.kernels``
(:data:`capsjax.config.KERNELS`): ``"auto"`` uses this package on the CPU backend only.
"""

from capsjax.fast.conv import conv2d, extract_patches
from capsjax.fast.routing import parent_major_predictions, parent_major_routing

__all__ = ["conv2d", "extract_patches", "parent_major_predictions", "parent_major_routing"]
