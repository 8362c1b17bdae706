"""capsjax: Capsule Networks (Sabour, Frosst & Hinton, 2017) in JAX and Flax.

The public API: the pure capsule functions (:func:`squash`, :func:`safe_norm`, :func:`capsule_predictions`,
:func:`dynamic_routing`, :func:`margin_loss`, :func:`reconstruction_loss`, :func:`mask_capsules`), the routing
algorithms behind one interface (``capsjax.routing``: dynamic, EM, inverted dot-product attention, self-attention),
the Flax NNX modules (:class:`CapsNet` and its layers, :class:`CapsuleLayer` that takes a routing algorithm by name,
:class:`EfficientCapsNet`, the baseline :class:`BaselineCNN`, :func:`build_model` and the registry :data:`MODELS`,
:class:`ModelConfig`), :func:`train_and_evaluate` (``capsjax.train``) and
:func:`predict` (``capsjax.evaluate``), and the submodules ``capsjax.config``, ``capsjax.data``, ``capsjax.evaluate``,
``capsjax.scoring`` (k-object set scoring) and ``capsjax.viz``. Each is imported on first use, so ``import capsjax``
loads nothing but this file, and
``import capsjax.config`` (the settings, a leaf) loads neither JAX nor Flax; JAX and Flax come with the first
function or module used, Orbax, Optax, TensorFlow Datasets and matplotlib only with the trainer, the evaluator, the
data package and the figures.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capsjax import config, data, evaluate, fast, layers, model, ops, routing, routing_layers, scoring, viz  # noqa
    from capsjax.config import ModelConfig
    from capsjax.layers import Conv2D, Decoder, PrimaryCapsules, RoutingCapsules
    from capsjax.baseline import BaselineCNN, CNNOutput
    from capsjax.efficient_capsnet import EfficientCapsNet
    from capsjax.routing_layers import CapsuleLayer, PrimaryMatrixCapsules
    from capsjax.model import MODELS, CapsNet, CapsNetOutput, build_model, count_params
    from capsjax.ops import capsule_predictions, dynamic_routing, margin_loss, mask_capsules, reconstruction_loss, safe_norm, squash
    from capsjax.evaluate import predict
    from capsjax.train import train_and_evaluate

__version__ = "0.1.0"

# The public names by the module that defines them; each is imported on first access (PEP 562).
_EXPORTS = {
    "capsjax.ops": ("safe_norm", "squash", "capsule_predictions", "dynamic_routing", "margin_loss",
                    "reconstruction_loss", "mask_capsules"),
    "capsjax.layers": ("Conv2D", "PrimaryCapsules", "RoutingCapsules", "Decoder"),
    "capsjax.model": ("CapsNet", "CapsNetOutput", "build_model", "MODELS", "count_params"),
    "capsjax.baseline": ("BaselineCNN", "CNNOutput"),
    "capsjax.efficient_capsnet": ("EfficientCapsNet",),
    "capsjax.routing_layers": ("CapsuleLayer", "PrimaryMatrixCapsules"),
    "capsjax.config": ("ModelConfig",),
    "capsjax.train": ("train_and_evaluate",),
    "capsjax.evaluate": ("predict",),
}  # fmt: skip
_SUBMODULES = ("ops", "routing", "layers", "routing_layers", "model", "baseline", "efficient_capsnet", "fast", "config",
               "data", "evaluate", "scoring", "viz")

__all__ = [name for names in _EXPORTS.values() for name in names]  # noqa: PLE0605 (built from the table above)

# name -> (module, attribute); attribute None: the module itself.
_LAZY = {
    **{name: (module, name) for module, names in _EXPORTS.items() for name in names},
    **{name: (f"capsjax.{name}", None) for name in _SUBMODULES},
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
