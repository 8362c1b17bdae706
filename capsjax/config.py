"""Every setting as frozen dataclasses, named presets, dotted overrides, JSON round trip.

A leaf: it imports only the standard library, so the CLIs, the data package and the tools can read and write configs
without loading JAX, Flax or Optax. :class:`ModelConfig` is re-exported by :mod:`capsjax.model` and :mod:`capsjax`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np

from capsjax.files import read_json, write_atomic

ARCHS = ("capsnet", "cnn", "efficient_capsnet")  # ModelConfig.arch: capsjax.model.MODELS (kept equal by a test)
KERNELS = ("auto", "fast", "textbook")  # ModelConfig.kernels; "auto": "fast" on the CPU backend (capsjax.layers)
PRECISIONS = ("float32", "mixed")  # ModelConfig.precision (capsjax.precision)
# ModelConfig's sizes: ints >= 1 (checked when it is made)
_POSITIVE_INTS = ("num_classes", "num_targets", "conv1_channels", "conv1_kernel", "primary_maps", "primary_dim",
                  "primary_kernel", "primary_stride", "class_dim", "routing_iterations", "cnn_kernel")  # fmt: skip
_POSITIVE_INT_TUPLES = ("decoder_hidden", "cnn_hidden", "effcaps_stem_channels", "effcaps_stem_kernels",
                        "effcaps_stem_strides")  # fmt: skip
_BOOLS = ("routing_stop_gradient", "routing_bias", "use_decoder")
_REALS = ("routing_init_std", "routing_em_inverse_temperature", "cnn_dropout")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


ROUTINGS = ("dynamic", "em", "inverted_attention", "self_attention")  # ModelConfig.routing: capsjax.routing.ALGORITHMS
AUGMENTATIONS = ("shift", "efficient_capsnet")  # TrainConfig.augmentation: capsjax.data.augment.train_augmentation


class ConfigError(ValueError):
    """A preset, override or config file that cannot be used; the message says what to change."""


def check_kernels(kernels: str) -> None:
    """Raises unless ``kernels`` is one of :data:`KERNELS` (without asking JAX for its backend)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


def conv_output_size(size: int, kernel: int, stride: int) -> int:
    """Spatial size of a VALID convolution's output; raises if the kernel does not fit."""
    if size < kernel:
        raise ValueError(f"a {kernel}x{kernel} kernel does not fit an input of size {size}")
    return (size - kernel) // stride + 1


# The ModelConfig fields that only one architecture reads, by name prefix (a field matching none of them is shared).
# A resumed run ignores changes to the fields its architecture does not read (capsjax.workdir.check_resume).
ARCH_FIELDS = {
    "capsnet": ("conv1_", "primary_", "class_dim", "routing", "decoder_hidden", "use_decoder"),
    "cnn": ("cnn_",),
    "efficient_capsnet": ("effcaps_", "primary_dim", "class_dim", "decoder_hidden", "use_decoder"),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every size of the networks. ``arch`` chooses the model (:data:`ARCHS`); the defaults are the paper's MNIST
    CapsNet (8,215,568 parameters), and ``arch="cnn"`` its baseline CNN (35,445,522 parameters on MNIST)."""

    arch: str = "capsnet"  # "capsnet" | "cnn" (the paper's baseline): a key of capsjax.model.MODELS
    image_shape: tuple[int, int, int] = (28, 28, 1)  # H, W, C
    num_classes: int = 10
    num_targets: int = 1  # objects per image: 2 for MultiMNIST (k-hot targets, k reconstructions, top-k prediction)
    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_maps: int = 32  # capsule types in the primary layer
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    class_dim: int = 16  # pose dimension of the class ("digit") capsules
    routing_iterations: int = 3
    routing_stop_gradient: bool = False
    routing_bias: bool = False  # the per-parent bias of the authors' released code (+ num_classes * class_dim params)
    routing_init_std: float = 0.1
    decoder_hidden: tuple[int, ...] = (512, 1024)
    use_decoder: bool = True
    kernels: str = "auto"  # "auto" | "fast" | "textbook": capsjax.fast or capsjax.ops (see capsjax.layers)
    # "mixed": bfloat16 operands, float32 accumulation in the convolutions' and the decoder's products, forward and
    # backward; parameters, routing, losses and reductions stay float32 (capsjax.precision)
    precision: str = "float32"
    # CapsNet's class-capsule routing (capsjax.routing): "dynamic" (the paper) | "em" | "inverted_attention" |
    # "self_attention". With "em" the primary capsules are sqrt(class_dim) x sqrt(class_dim) pose matrices (4x4) with
    # an activation each, and primary_dim is not used (capsjax.routing_layers).
    routing: str = "dynamic"
    # routing "em": final_lambda of the inverse temperature schedule lambda_t = final_lambda (1 - 0.95^(t+1))
    # (capsjax.routing.em). The class scores are logistic(lambda_t (beta_a - cost)): with 1, lambda_t is 0.14 at the
    # third iteration and the scores hardly leave 0.5 (see the README's routing section for the measurements)
    routing_em_inverse_temperature: float = 20.0
    # the baseline CNN (arch="cnn"): SAME convolutions with ReLU, fully connected ReLU layers, dropout, linear output
    cnn_channels: tuple[int, ...] = (256, 256, 128)
    cnn_kernel: int = 5
    cnn_hidden: tuple[int, ...] = (328, 192)
    cnn_dropout: float = 0.5  # drop rate before the output layer, in training only
    # Efficient-CapsNet (arch="efficient_capsnet", capsjax.efficient_capsnet): the stem's VALID convolutions (ReLU, then
    # Batch Normalization); its last channels become effcaps_stem_channels[-1] / primary_dim primary capsules. It also
    # reads primary_dim, class_dim, decoder_hidden and use_decoder; its routing is self-attention.
    effcaps_stem_channels: tuple[int, ...] = (32, 64, 64, 128)
    effcaps_stem_kernels: tuple[int, ...] = (5, 3, 3, 3)
    effcaps_stem_strides: tuple[int, ...] = (1, 1, 1, 2)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if len(self.image_shape) != 3 or not all(_is_int(v) and v >= 1 for v in self.image_shape):
            raise ValueError(f"image_shape must be (height, width, channels), ints >= 1, got {self.image_shape}")
        for name in _POSITIVE_INTS:  # a 0 divided by zero deep in the layers; 2.5 iterations failed at the first call
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in _POSITIVE_INT_TUPLES:
            if any(not _is_int(v) or v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must hold ints >= 1, got {getattr(self, name)!r}")
        for name in _BOOLS:  # the string "false" is true
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))  # (NumPy's bool: a plain one, for JSON)
        for name in _REALS:  # a NaN or infinite one made every output NaN
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 1 <= self.num_targets <= self.num_classes:
            raise ValueError(f"num_targets must lie in [1, num_classes={self.num_classes}], got {self.num_targets}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        check_kernels(self.kernels)  # "auto" is resolved in the layers: here it would start JAX's backend
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {list(ROUTINGS)}, got {self.routing!r}")
        if self.arch == "capsnet":
            self.primary_grid  # raises if the convolution kernels do not fit the image
            if self.routing == "em" and round(self.class_dim**0.5) ** 2 != self.class_dim:
                raise ValueError(
                    f"routing 'em' needs class_dim = p * p for p x p poses (16: 4x4), got {self.class_dim}"
                )
            if self.routing != "dynamic" and (self.routing_bias or self.routing_stop_gradient):
                raise ValueError("routing_bias and routing_stop_gradient apply to routing 'dynamic' only")
            if not self.routing_em_inverse_temperature > 0:
                raise ValueError(f"routing_em_inverse_temperature must be > 0, "
                                 f"got {self.routing_em_inverse_temperature}")  # fmt: skip
        if self.arch == "efficient_capsnet":
            self._check_efficient_capsnet()
        sizes = (*self.cnn_channels, self.cnn_kernel, *self.cnn_hidden)
        if not self.cnn_channels or min(sizes) < 1:
            raise ValueError("cnn_channels (at least one), cnn_kernel and cnn_hidden must be positive")
        if not 0.0 <= self.cnn_dropout < 1.0:
            raise ValueError(f"cnn_dropout must lie in [0, 1), got {self.cnn_dropout}")

    @property
    def unused_fields(self) -> tuple[str, ...]:
        """The fields that ``arch`` does not read (those :data:`ARCH_FIELDS` gives to the other architectures)."""
        own = ARCH_FIELDS.get(self.arch, ())
        others = tuple(p for arch, prefixes in ARCH_FIELDS.items() if arch != self.arch for p in prefixes)
        return tuple(
            f.name for f in dataclasses.fields(self) if f.name.startswith(others) and not f.name.startswith(own)
        )

    def _check_efficient_capsnet(self) -> None:
        stem = (self.effcaps_stem_channels, self.effcaps_stem_kernels, self.effcaps_stem_strides)
        if not len(stem[0]) == len(stem[1]) == len(stem[2]) >= 1 or min(min(x) for x in stem) < 1:
            raise ValueError("effcaps_stem_channels, _kernels and _strides need one positive entry per convolution")
        if stem[0][-1] % self.primary_dim:
            raise ValueError(f"effcaps_stem_channels[-1] = {stem[0][-1]} must be a multiple of primary_dim "
                             f"{self.primary_dim} (the primary capsules)")  # fmt: skip
        for size in self.image_shape[:2]:
            for kernel, stride in zip(stem[1], stem[2]):
                size = conv_output_size(size, kernel, stride)

    @property
    def primary_grid(self) -> tuple[int, int]:
        """Spatial size of the primary-capsule grid (6 x 6 for MNIST)."""
        height, width, _ = self.image_shape
        return tuple(
            conv_output_size(conv_output_size(size, self.conv1_kernel, 1), self.primary_kernel, self.primary_stride)
            for size in (height, width)
        )

    @property
    def num_primary_capsules(self) -> int:
        """Number of primary capsules (1152 for MNIST)."""
        gh, gw = self.primary_grid
        return gh * gw * self.primary_maps


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The terms of the training objective (the paper's by default)."""

    m_plus: float = 0.9
    m_minus: float = 0.1
    lambda_: float = 0.5
    recon_weight: float = 0.0005
    recon_reduction: str = "sum"  # "sum" (paper) or "mean" (the tutorial's, 784x weaker on MNIST)


SCHEDULES = ("exponential", "cosine")  # OptimConfig.schedule


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam and its learning-rate schedule.

    ``"exponential"`` (the paper): ``learning_rate * decay_rate ** (step / decay_steps)`` (floored with
    ``staircase``), after a linear warm-up from 0 over ``warmup_steps`` if that is set (the decay's ``step`` then
    counts from the warm-up's end). ``"cosine"``: a linear warm-up from 0 to ``learning_rate`` over
    ``warmup_steps``, then a cosine decay to ``min_learning_rate`` at step ``decay_steps`` (the warm-up included),
    constant after that. Neither goes below ``min_learning_rate``.
    """

    learning_rate: float = 1e-3
    schedule: str = "exponential"
    decay_rate: float = 0.96
    decay_steps: int = 2000
    staircase: bool = False
    warmup_steps: int = 0
    min_learning_rate: float = 0.0

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.learning_rate < float("inf") or self.decay_steps < 1 or self.warmup_steps < 0:  # NaN too
            raise ConfigError("optim.learning_rate and optim.decay_steps must be > 0, optim.warmup_steps >= 0")
        if self.schedule == "cosine" and self.warmup_steps >= self.decay_steps:
            raise ConfigError(
                f"optim.warmup_steps ({self.warmup_steps}) must be below optim.decay_steps ({self.decay_steps}), "
                "the length of the cosine schedule"
            )


MERGES = ("sum", "max")  # MultiMNISTConfig.merge (capsjax.data.multimnist)


@dataclasses.dataclass(frozen=True)
class MultiMNISTConfig:
    """MultiMNIST pairs (paper section 6), used when ``TrainConfig.dataset`` is ``"multimnist"``.

    Training pairs are made on the fly from the training split's digits (one epoch: each digit the base of one
    pair); validation pairs, a fixed set, from the held-out training digits; the test pairs, a fixed set, from the
    test split. See :mod:`capsjax.data.multimnist` for the rules."""

    digits: str = "mnist"  # the dataset the digits come from
    canvas: int = 36  # the digits (28 x 28) zero-padded to canvas x canvas
    shift: int = 4  # each digit shifted by up to this many pixels in each direction (the paper: 4)
    merge: str = "sum"  # "sum": min(a + b, 255) in uint8 (the authors' generator); "max": the pixel-wise maximum
    per_base_shift: bool = True  # the base digit's shift drawn once per digit (the authors' generator)
    validation_pairs: int = 5000
    test_pairs: int = 10_000  # the paper's evaluation reads 10,000 test pairs
    test_seed: int = 0  # seeds the fixed validation and test pairs (not TrainConfig.seed: every run scores the same)

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ConfigError(f"multimnist.merge must be one of {list(MERGES)}, got {self.merge!r}")
        if self.shift < 0 or self.canvas < 1 or self.validation_pairs < 1 or self.test_pairs < 1:
            raise ConfigError("multimnist: shift must be >= 0; canvas, validation_pairs and test_pairs >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. Written to ``<workdir>/config.json`` with the run."""

    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    dataset: str = "mnist"  # a name of capsjax.data.DATASETS, or "multimnist" (pairs of the multimnist.digits set)
    data_dir: str | None = None
    train_examples: int | None = None  # use only the first N training examples (after the validation hold-out)
    validation_examples: int = 5000  # the LAST N training examples are held out for validation; 0: validate on test
    batch_size: int = 128
    eval_batch_size: int = 100  # on a CPU as fast per image as 500, with a fifth of the scratch memory
    epochs: int = 50
    max_shift: int = 2  # random translation of up to this many pixels, zero padded (the paper's augmentation)
    canvas_size: int = 0  # expanded MNIST: 40 puts each training digit at a random offset on a 40x40 black canvas
    # (on device, every step) and the validation and test digits at fixed, seeded offsets (capsjax.data.canvas); 0: off
    horizontal_flip: bool = False  # mirror each training image left-right with probability 1/2 (clothes, not digits)
    # "shift": the paper's (max_shift, or canvas_size); "efficient_capsnet": the Efficient-CapsNet authors' rotation,
    # shift inside the margins, squish and erased patch (capsjax.data.augment; needs max_shift=0, canvas_size=0)
    augmentation: str = "shift"
    seed: int = 0
    log_every_steps: int = 50
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 2
    safe_checkpoint_margin: int = 500  # also keep the newest checkpoint this many steps behind the newest (divergence)
    progress: bool = True  # progress bar on a terminal; plain log lines every log_every_steps otherwise
    tensorboard: bool = True  # TensorBoard event files in <workdir>/tensorboard (scalars, reconstructions)
    test_every_epoch: bool = True  # also log test accuracy each epoch (model selection still uses validation only)
    # other test sets scored at every epoch's end, each logged as its own split in metrics.jsonl (e.g. affine_mnist
    # for a run on expanded MNIST: robustness against the run's own test accuracy, epoch by epoch); read from the
    # run's data_dir when built from its dataset's files, else from the dataset's default places
    also_test_on: tuple[str, ...] = ()
    multimnist: MultiMNISTConfig = MultiMNISTConfig()

    def __post_init__(self):
        positive = ("batch_size", "eval_batch_size", "epochs", "log_every_steps", "checkpoint_every_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        counts = (self.max_shift, self.validation_examples, self.safe_checkpoint_margin, self.canvas_size)
        if min(counts) < 0:
            raise ConfigError("max_shift, validation_examples, safe_checkpoint_margin and canvas_size must be >= 0")
        if self.canvas_size and self.max_shift:
            raise ConfigError(
                f"canvas_size={self.canvas_size} places the digits at random offsets, which replaces the random "
                f"shifts: set max_shift=0 (got {self.max_shift})"
            )
        if self.augmentation not in AUGMENTATIONS:
            raise ConfigError(f"augmentation must be one of {list(AUGMENTATIONS)}, got {self.augmentation!r}")
        if self.augmentation != "shift" and (self.max_shift or self.canvas_size):
            raise ConfigError(
                f"augmentation={self.augmentation!r} moves the digits itself: set max_shift=0 and canvas_size=0 "
                f"(got {self.max_shift} and {self.canvas_size})"
            )
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.train_examples is not None and self.train_examples < 1:
            raise ConfigError(f"train_examples must be >= 1, got {self.train_examples}")
        if self.loss.recon_reduction not in ("sum", "mean"):
            raise ConfigError(f"loss.recon_reduction must be 'sum' or 'mean', got {self.loss.recon_reduction!r}")
        pairs = self.dataset == "multimnist"
        if pairs and (self.max_shift or self.canvas_size or self.horizontal_flip or self.augmentation != "shift"):
            raise ConfigError(
                "multimnist pairs carry their own shifts (multimnist.shift): set max_shift=0, canvas_size=0, "
                "horizontal_flip=false and augmentation=shift"
            )
        reserved = {"train", "validation", "test", self.dataset}
        if reserved & set(self.also_test_on) or len(set(self.also_test_on)) < len(self.also_test_on):
            raise ConfigError(
                f"also_test_on={','.join(self.also_test_on)}: name other datasets than the run's own "
                f"({self.dataset}), each once"
            )
        if pairs != (self.model.num_targets == 2):
            raise ConfigError(
                f"dataset {self.dataset!r} with model.num_targets={self.model.num_targets}: MultiMNIST needs "
                "num_targets=2 (use --preset multimnist), other datasets 1"
            )


def _default() -> TrainConfig:
    """The paper: batch 128, Adam 1e-3 x0.96 every 2000 steps, 3 routing iterations, +-2 px shifts, 0.0005 * SSE."""
    return TrainConfig()


def _tutorial() -> TrainConfig:
    """The widely used tutorial notebook's settings: batch 50, no augmentation, 0.0005 * MEAN squared error,
    2 routing iterations, 10 epochs."""
    return TrainConfig(
        model=ModelConfig(routing_iterations=2),
        loss=LossConfig(recon_reduction="mean"),
        batch_size=50,
        max_shift=0,
        epochs=10,
    )


def _smoke() -> TrainConfig:
    """A tiny model on synthetic data: seconds on a CPU, for tests and trying the tools."""
    return TrainConfig(
        model=ModelConfig(
            conv1_channels=16, primary_maps=4, primary_dim=4, primary_kernel=9, class_dim=8, decoder_hidden=(64, 128)
        ),
        dataset="synthetic",
        train_examples=256,
        validation_examples=64,
        batch_size=32,
        eval_batch_size=64,
        epochs=2,
        log_every_steps=4,
        checkpoint_every_steps=4,
        safe_checkpoint_margin=8,
    )


def _fashion_mnist() -> TrainConfig:
    """The paper's model and schedule on Fashion-MNIST."""
    return dataclasses.replace(_default(), dataset="fashion_mnist")


# ceil(55,000 / batch), 5,000 of MNIST's images held out: the presets' decay lengths. The trainer drops a last partial
# batch, so where batch doesn't divide 55,000 an epoch runs one step fewer (the fast preset: 859 of 860 at batch 64,
# its learning rate about 1e-8 at its last step, not 0; kept so that the recorded runs are the preset's).
MNIST_TRAIN_STEPS = {batch: -(-55000 // batch) for batch in (32, 64, 128)}


def _fast() -> TrainConfig:
    """Time to accuracy on a CPU: the paper's model, batch 64, a higher learning rate (2e-3) warmed up over 300 steps
    then decayed to about 0 by a cosine over 5 epochs; random shifts as in the paper. ``--epochs`` shortens the run but
    not the schedule: set ``optim.decay_steps`` too."""
    epochs, batch = 5, 64
    return dataclasses.replace(
        _default(),
        batch_size=batch,
        epochs=epochs,
        optim=OptimConfig(
            learning_rate=2e-3, schedule="cosine", warmup_steps=300, decay_steps=epochs * MNIST_TRAIN_STEPS[batch]
        ),
    )


def _quick() -> TrainConfig:
    """A first real result on a CPU in minutes: one epoch over the first 20,000 MNIST training images at batch 32,
    the learning rate warmed up to 2e-3 over 50 steps and decayed to 0 by a cosine at the epoch's end (a final model
    that does not depend on the last steps' noise), the paper's shifts; validated on 5,000 held-out images, then
    scored on the full test set."""
    examples, batch = 20000, 32
    optim = OptimConfig(learning_rate=2e-3, schedule="cosine", warmup_steps=50, decay_steps=examples // batch)
    return dataclasses.replace(_default(), batch_size=batch, epochs=1, train_examples=examples, optim=optim)


def _accelerator() -> TrainConfig:
    """The paper's model for GPUs and TPUs: mixed precision (bfloat16 products; routing stays float32), batch 512,
    the learning rate decayed by x0.96 per 500 steps (an epoch has 4 times fewer steps than at batch 128: each epoch
    decays as much as the paper's)."""
    paper = _default()
    return dataclasses.replace(
        paper,
        model=ModelConfig(precision="mixed"),
        optim=dataclasses.replace(paper.optim, decay_steps=paper.optim.decay_steps * paper.batch_size // 512),
        batch_size=512,
        eval_batch_size=1000,
        log_every_steps=20,
    )


def _baseline() -> TrainConfig:
    """The paper's baseline CNN (``model.arch="cnn"``) with the default's optimizer, schedule and +-2 px shifts."""
    return dataclasses.replace(_default(), model=ModelConfig(arch="cnn"))


def _expanded_mnist() -> TrainConfig:
    """Expanded MNIST (section 5.2 of the paper): each training digit at a random position of a 40x40 black canvas
    (no other augmentation), the model sized for 40x40 inputs (12 x 12 x 32 primary capsules); ``--arch cnn`` for
    the baseline. The learning rate is warmed up from 0 over the first 200 steps, as for MultiMNIST: at 1e-3 from the
    first step, Adam's first update saturated every class capsule (the margin loss went from 1.3 to 3.5, chance, in
    one step and stayed there for ~200 steps; measured on this model, batch 128)."""
    return dataclasses.replace(
        _default(),
        model=ModelConfig(image_shape=(40, 40, 1)),
        optim=OptimConfig(warmup_steps=200),
        canvas_size=40,
        max_shift=0,
    )


def _efficient_capsnet() -> TrainConfig:
    """Efficient-CapsNet on MNIST (``model.arch="efficient_capsnet"``) with the authors' released settings: batch 16,
    Adam 5e-4 decayed x0.97 every epoch (of the 55,000 training images left by the validation hold-out) to no less
    than 5e-5, 150 epochs, margin loss + 0.0005 x summed squared reconstruction error (their 0.392 x mean), and
    their augmentation (``augmentation="efficient_capsnet"``: rotations, shifts inside the margins, squishing,
    erased patches) instead of the paper's +-2 px shifts."""
    return dataclasses.replace(
        _default(),
        model=ModelConfig(arch="efficient_capsnet"),
        augmentation="efficient_capsnet",
        max_shift=0,
        optim=OptimConfig(learning_rate=5e-4, decay_rate=0.97, decay_steps=55_000 // 16, staircase=True,
                          min_learning_rate=5e-5),  # fmt: skip
        batch_size=16,
        epochs=150,
        log_every_steps=200,
        checkpoint_every_steps=4000,
        safe_checkpoint_margin=2000,
    )


def _multimnist() -> TrainConfig:
    """The paper's MultiMNIST experiment (section 6): the CapsNet on 36 x 36 pairs of digits (3,200 primary capsules),
    two-hot targets and two reconstructions, pairs made on the fly (no other shift), the learning-rate decay period
    10x longer (20,000 steps). An epoch is one pass over the 55,000 training digits as bases (429 steps). The
    learning rate is warmed up from 0 over the first 200 steps: at 1e-3 from the first step every class capsule
    saturated to length ~1 within 10 steps and the margin loss stayed at ~3.1 (chance), measured on this model."""
    return TrainConfig(
        model=ModelConfig(image_shape=(36, 36, 1), num_targets=2),
        optim=OptimConfig(decay_steps=20_000, warmup_steps=200),
        dataset="multimnist",
        max_shift=0,
        epochs=100,
    )


def _multimnist_baseline() -> TrainConfig:
    """The paper's baseline CNN (``model.arch="cnn"``) trained and scored as the ``multimnist`` preset: the same pairs,
    schedule and budget; two-hot targets through a per-class sigmoid cross-entropy, the top two logits as the
    prediction."""
    config = _multimnist()
    return dataclasses.replace(config, model=dataclasses.replace(config.model, arch="cnn"))


PRESETS = {
    "default": _default,
    "baseline": _baseline,
    "expanded_mnist": _expanded_mnist,
    "efficient_capsnet": _efficient_capsnet,
    "tutorial": _tutorial,
    "smoke": _smoke,
    "fashion_mnist": _fashion_mnist,
    "fast": _fast,
    "quick": _quick,
    "accelerator": _accelerator,
    "multimnist": _multimnist,
    "multimnist_baseline": _multimnist_baseline,
}


def get_config(name: str = "default") -> TrainConfig:
    """A named preset: default (the paper), baseline (its CNN), expanded_mnist, efficient_capsnet, tutorial, smoke,
    fashion_mnist, fast, quick, accelerator, multimnist, multimnist_baseline."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Converts a JSON value or a command-line string to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in options:
                return None
        inner = [t for t in options if t is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        (inner, *_) = typing.get_args(hint)
        return tuple(_coerce(v, inner, name) for v in value)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if hint in (int, float, str):
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return hint(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}") from None
    return value


def replace_path(config, path: str, value: Any):
    """``replace_path(config, "model.routing_iterations", "2")``: a copy with one (nested) field changed; an invalid
    result raises :class:`ConfigError` prefixed with the override (``model.routing_iterations='0': ...``)."""
    data = to_dict(config)
    _set_in(data, type(config), path, value)
    try:
        return from_dict(type(config), data)
    except ConfigError as err:
        raise ConfigError(f"{path}={value!r}: {err}") from None


def replace_paths(config, items: list[tuple[str, Any]]):
    """A copy with several (nested) fields changed, ``[("max_shift", "2"), ("augmentation", "shift")]``, checked
    together once all are set: fields that must change together (e.g. ``augmentation`` and ``max_shift``) may come
    in any order. An invalid result raises :class:`ConfigError` naming the first override that made it invalid."""
    data = to_dict(config)
    for path, value in items:
        _set_in(data, type(config), path, value)
    try:
        return from_dict(type(config), data)
    except ConfigError:
        for path, value in items:  # one at a time, for the message of replace_path naming the override
            config = replace_path(config, path, value)
        raise


def _set_in(data: dict[str, Any], cls, path: str, value: Any, _done: str = "") -> None:
    """Sets ``path`` (dotted) in ``data``, :func:`to_dict`'s form of a ``cls``, to ``value`` coerced to its type."""
    head, _, rest = path.partition(".")
    types_ = _field_types(cls)
    if head not in types_:
        raise ConfigError(f"unknown config field {_done + head!r}; fields here: {', '.join(types_)}")
    if rest:
        if not dataclasses.is_dataclass(types_[head]):
            raise ConfigError(f"{_done + head!r} has no sub-fields")
        _set_in(data[head], types_[head], rest, value, f"{_done}{head}.")
    elif dataclasses.is_dataclass(types_[head]):
        raise ConfigError(f"{_done + head!r} is a group of fields; set e.g. {_done}{head}.<field>=value")
    else:
        data[head] = _coerce(value, types_[head], _done + path)


def to_dict(config) -> dict[str, Any]:
    """Plain JSON-able dict (nested)."""
    return dataclasses.asdict(config)


# Fields renamed since a release: old name -> (new name, old value -> new value)
_RENAMED = {ModelConfig: {"conv_dtype": ("precision", lambda dtype: "float32" if dtype == "float32" else "mixed")}}


def from_dict(cls, data: dict[str, Any]):
    """Rebuilds a (nested) config dataclass from :func:`to_dict`'s output; unknown keys are an error (fields renamed
    since, like ``model.conv_dtype``, are read under their new name)."""
    if not isinstance(data, dict):  # e.g. "model": "resnet50" in someone else's config.json
        raise ConfigError(f"{cls.__name__} must be a JSON object of its fields, got {type(data).__name__} {data!r:.40}")
    data = dict(data)
    for old, (new, convert) in _RENAMED.get(cls, {}).items():
        if old in data and new not in data:
            data[new] = convert(data.pop(old))
    types_ = _field_types(cls)
    unknown = set(data) - set(types_)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        hint = types_[name]
        kwargs[name] = from_dict(hint, value) if dataclasses.is_dataclass(hint) else _coerce(value, hint, name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None


def is_saved_config(data: Any) -> bool:
    """Whether JSON ``data`` has the shape of :func:`save_config`'s output (a ``model`` with its ``arch`` and an
    ``optim``): a config.json of another program's, or ``{}``, would otherwise read as defaults."""
    return (
        isinstance(data, dict)
        and isinstance(data.get("model"), dict)
        and "arch" in data["model"]
        and isinstance(data.get("optim"), dict)
    )


def save_config(config: TrainConfig, path: Path) -> None:
    """Writes ``config`` as indented JSON (:func:`to_dict`) to ``path``."""
    write_atomic(path, json.dumps(to_dict(config), indent=2) + "\n")


def load_config(path: Path) -> TrainConfig:
    """Reads a :class:`TrainConfig` written by :func:`save_config` (e.g. ``<workdir>/config.json``); raises
    :class:`ConfigError` if the file is missing, not JSON, or has unknown or ill-typed fields."""
    path = Path(path)
    try:
        return from_dict(TrainConfig, read_json(path, "restore it, or start a new run in another folder", ConfigError))
    except (FileNotFoundError, NotADirectoryError):  # (NotADirectoryError: its folder is a file)
        raise ConfigError(f"{path} not found: is this a capsjax work directory?") from None
