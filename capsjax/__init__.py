"""capsjax: Capsule Networks (Sabour, Frosst & Hinton, 2017) in JAX and Flax.

The pure capsule functions (:func:`squash`, :func:`safe_norm`, :func:`capsule_predictions`, :func:`dynamic_routing`,
:func:`margin_loss`, :func:`reconstruction_loss`, :func:`mask_capsules`) and the Flax NNX modules (:class:`CapsNet` and
its layers) are imported with the package. The trainer, the evaluator, the data pipeline and the figures are loaded on
first use, so ``import capsjax`` does not pull in Orbax, Optax, TensorFlow Datasets or matplotlib:

- :func:`train_and_evaluate` (``capsjax.train``) and :func:`predict` (``capsjax.evaluate``);
- the submodules ``capsjax.data``, ``capsjax.config``, ``capsjax.evaluate`` and ``capsjax.viz``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules
from capsjax.model import CapsNet, CapsNetOutput, ModelConfig, count_params
from capsjax.ops import capsule_predictions, dynamic_routing, margin_loss, mask_capsules, reconstruction_loss, safe_norm, squash

if TYPE_CHECKING:
    from capsjax import config, data, evaluate, viz  # noqa: F401
    from capsjax.evaluate import predict
    from capsjax.train import train_and_evaluate

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 (grouped: functions, layers, model, training)
    "safe_norm",
    "squash",
    "capsule_predictions",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "mask_capsules",
    "Conv2D",
    "PrimaryCapsules",
    "RoutingCapsules",
    "Decoder",
    "CapsNet",
    "CapsNetOutput",
    "ModelConfig",
    "count_params",
    "train_and_evaluate",
    "predict",
]

# name -> (module, attribute); attribute None: the module itself. Imported on first access (PEP 562).
_LAZY = {
    "train_and_evaluate": ("capsjax.train", "train_and_evaluate"),
    "predict": ("capsjax.evaluate", "predict"),
    "config": ("capsjax.config", None),
    "data": ("capsjax.data", None),
    "evaluate": ("capsjax.evaluate", None),
    "viz": ("capsjax.viz", None),
}


def __getattr__(name: str) -> Any:
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'capsjax' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
