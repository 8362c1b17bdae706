"""Pure training and evaluation steps: the loss, the optimizer, and jit-compiled steps over a device mesh.

The model lives as an NNX ``GraphDef`` (static structure) plus a ``TrainState`` pytree (parameters, optimizer state,
step, base key), so the steps are plain functions of pytrees that ``jax.jit`` shards, donates and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from capsjax import ops, scoring
from capsjax.config import LossConfig, ModelConfig, OptimConfig
from capsjax.model import build_model

# The model's training key (dropout) is fold_in(step key, _MODEL_KEY); the augmentation takes the step key itself.
_MODEL_KEY = 0x6D6F


# How many steps the host may dispatch ahead of the devices. Two keep an accelerator's queue full; an unbounded queue
# is what deadlocks XLA:CPU's in-process collectives (several CPU devices in one process, e.g. with
# --xla_force_host_platform_device_count: a few dozen queued data-parallel steps hang at an all-reduce, jaxlib 0.10.2).
MAX_IN_FLIGHT = 2


def wait_for_queue(dispatched: list) -> None:
    """Blocks until at most :data:`MAX_IN_FLIGHT` of ``dispatched`` (step results, oldest first) are still running."""
    if len(dispatched) > MAX_IN_FLIGHT:
        jax.block_until_ready(dispatched[-MAX_IN_FLIGHT - 1])


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; a pytree, so it is jitted, sharded and checkpointed whole."""

    step: jax.Array
    params: Any
    opt_state: Any
    key: jax.Array  # raw data of the base key (uint32); step keys are fold_in(key, step)


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """The learning rate by step (:class:`~capsjax.config.OptimConfig`): a linear warm-up over ``warmup_steps`` (if
    any), then exponential decay (counted from the warm-up's end) or a cosine decay, never below
    ``min_learning_rate``. The optimizer follows it and the train step logs it."""
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, config.decay_steps, end_value=config.min_learning_rate
        )
    decay = optax.exponential_decay(
        config.learning_rate, config.decay_steps, config.decay_rate, staircase=config.staircase,
        end_value=config.min_learning_rate or None,
    )  # fmt: skip
    if not config.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])  # the decay counts from the warm-up's end


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Adam (default betas) following :func:`make_schedule`."""
    return optax.adam(make_schedule(config))


def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images pass through as float32."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def correct_predictions(scores: jax.Array, targets: jax.Array) -> jax.Array:
    """Per example ``[B]`` (bool): the argmax of ``scores`` [B, K] is the int label ``targets`` [B]; or, for k-hot
    ``targets`` [B, K], the k highest scores are exactly the k target classes, ties going to the lower class index
    as in the authors' ``top_k`` (:func:`capsjax.scoring.khot_exact_and_almost`)."""
    if targets.ndim == scores.ndim - 1:
        return jnp.argmax(scores, axis=-1) == targets
    return scoring.khot_exact_and_almost(scores, targets)[0]


def compute_losses(model, output, images: jax.Array, targets: jax.Array, config: LossConfig) -> dict[str, jax.Array]:
    """Batch means of ``model.per_example_losses`` and the accuracy (:func:`correct_predictions`): the train step's
    metrics; for k-hot targets also the almost-correct rate (at least one of the k classes among the top k)."""
    terms = model.per_example_losses(output, images, targets, config)
    metrics = {name: jnp.mean(term) for name, term in terms.items()}
    scores = model.class_scores(output)
    metrics["accuracy"] = jnp.mean(correct_predictions(scores, targets).astype(jnp.float32))
    if targets.ndim == scores.ndim:
        metrics["almost_accuracy"] = jnp.mean(scoring.khot_exact_and_almost(scores, targets)[1].astype(jnp.float32))
    return metrics


class DonatingStep:
    """A jitted step that donates its first argument (the train state's buffers become the new state's), refusing a
    state whose buffers an earlier call took: JAX raises for that on one device but crashes the process (segmentation
    fault) with the state replicated over several. Other attributes (``lower``, ...) are the jitted function's."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted

    def __call__(self, state, *args):
        if any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state)):
            raise ValueError(
                "this train state was donated to an earlier train step: use the state that step returned "
                "(state, metrics = steps.train(state, ...)), or copy it first (jax.tree.map(jnp.copy, state))"
            )
        return self._jitted(state, *args)

    def __getattr__(self, name: str):
        return getattr(self._jitted, name)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jit-compiled steps of one model on one mesh.

    ``train(state, images, labels) -> (state, metrics)`` (it donates ``state``: use the returned one; a
    :class:`DonatingStep`), ``evaluate(params, images, labels, mask) -> sums`` and
    ``predict(params, images) -> output`` (the model's output tuple) take uint8 or float images ``[B, H, W, C]``,
    int labels ``[B]`` or k-hot targets ``[B, K]``, and a 0/1 mask ``[B]``, sharded along the mesh's ``data`` axis.
    For ``num_targets = k > 1`` (MultiMNIST) ``train`` and ``evaluate`` take one more argument, ``digits``
    ``[B, k, H, W, C]``: each object alone, in ascending class order, the targets of the k reconstructions.
    """

    graphdef: Any
    mesh: Mesh
    train: Callable
    evaluate: Callable
    predict: Callable

    @property
    def data_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P("data"))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())


def default_mesh() -> Mesh:
    """A 1-D ``data`` mesh over every device of every process (automatic sharding propagation)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))


def init_state(
    model_config: ModelConfig, optim_config: OptimConfig, seed: int, mesh: Mesh | None = None
) -> tuple[Any, TrainState]:
    """Builds the model ``model_config.arch`` (:func:`capsjax.model.build_model`) and its ``TrainState``, created
    directly replicated over ``mesh``."""
    mesh = mesh or default_mesh()
    abstract = nnx.eval_shape(lambda: build_model(model_config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    tx = make_optimizer(optim_config)

    def create():
        params_key, base_key = jax.random.split(jax.random.key(seed))
        _, params = nnx.split(build_model(model_config, rngs=nnx.Rngs(params_key)))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), key=jax.random.key_data(base_key)
        )

    state = jax.jit(create, out_shardings=NamedSharding(mesh, P()))()
    return graphdef, state


def make_steps(
    graphdef,
    optim_config: OptimConfig,
    loss_config: LossConfig = LossConfig(),
    *,
    max_shift: int = 0,
    mesh: Mesh | None = None,
    augment: Callable | None = None,
    num_targets: int = 1,
) -> Steps:
    """Compiles the train, eval and predict steps (``num_targets``: the model's, see :class:`Steps`).

    ``augment(key, images) -> images`` (float images in [0, 1]) runs inside the train step with the per-step key
    ``fold_in(state.key, state.step)``; by default it is the random shift of up to ``max_shift`` pixels. The model
    gets ``key=fold_in(step key, _MODEL_KEY)`` in the train step (dropout) and no key in the eval and predict steps.
    The loss and the scores are the model's (``per_example_losses``, ``class_scores``: :mod:`capsjax.model`).
    """
    mesh = mesh or default_mesh()
    tx, schedule = make_optimizer(optim_config), make_schedule(optim_config)
    if augment is None and max_shift > 0:
        from capsjax.data.augment import random_shift

        def augment(key, images):
            return random_shift(key, images, max_shift)

    def loss_fn(params, images, labels, recon_targets, key):
        model = nnx.merge(graphdef, params)
        metrics = compute_losses(model, model(images, labels, key=key), recon_targets, labels, loss_config)
        return metrics["loss"], (metrics, nnx.state(model, nnx.BatchStat))  # running statistics the call updated

    def train_step(state: TrainState, images, labels, digits=None):
        images = to_unit_float(images)
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        if augment is not None:
            images = augment(step_key, images)
        model_key = jax.random.fold_in(step_key, _MODEL_KEY)
        recon_targets = images if digits is None else to_unit_float(digits)
        loss_args = (state.params, images, labels, recon_targets, model_key)
        grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(*loss_args)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int32 count with float32 moments
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # Batch statistics get zero gradients (so zero Adam updates) and take the values the forward pass computed.
        params = nnx.merge_state(optax.apply_updates(state.params, updates), batch_stats)
        metrics["learning_rate"] = schedule(state.step)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(params, images, labels, mask, digits=None):
        """Sums over the examples where ``mask`` is 1 (padding has 0), without targets (CapsNet decodes the predicted
        class, or the k predicted classes): loss terms (the reconstructions scored against ``digits`` when given),
        correct count, for k-hot labels the almost-correct count, and the confusion matrix (for k-hot labels the
        per-digit one, :func:`capsjax.scoring.pair_confusion`)."""
        images = to_unit_float(images)
        model = nnx.merge(graphdef, params)
        out = model(images)
        scores = model.class_scores(out)
        weight = mask.astype(jnp.float32)
        terms = model.per_example_losses(out, images if digits is None else to_unit_float(digits), labels, loss_config)
        sums = {name: jnp.sum(term * weight) for name, term in terms.items()}
        sums["correct"] = jnp.sum(jnp.where(correct_predictions(scores, labels), weight, 0.0))
        sums["count"] = jnp.sum(weight)
        num_classes = scores.shape[-1]
        if labels.ndim == 1:
            preds = jnp.argmax(scores, axis=-1)
            confusion = jnp.zeros((num_classes, num_classes), jnp.int32)
            sums["confusion"] = confusion.at[labels, preds].add(mask.astype(jnp.int32))
        else:
            sums["almost"] = jnp.sum(jnp.where(scoring.khot_exact_and_almost(scores, labels)[1], weight, 0.0))
            if num_targets > 1:  # every example has num_targets classes
                preds, classes = (scoring.top_k_classes(s, num_targets) for s in (scores, labels))
                sums["confusion"] = scoring.pair_confusion(preds, classes, num_classes, mask)
        return sums

    def predict_step(params, images):
        model = nnx.merge(graphdef, params)
        return model(to_unit_float(images))

    data = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    digits = (data,) if num_targets > 1 else ()  # the k-object steps take the objects' images too
    if num_targets == 1:
        train_step, eval_step = functools.partial(train_step, digits=None), functools.partial(eval_step, digits=None)
    return Steps(
        graphdef=graphdef,
        mesh=mesh,
        train=DonatingStep(
            jax.jit(
                train_step,
                in_shardings=(replicated, data, data, *digits),
                out_shardings=(replicated, replicated),
                donate_argnums=0,
            )
        ),
        evaluate=jax.jit(eval_step, in_shardings=(replicated, data, data, data, *digits), out_shardings=replicated),
        predict=jax.jit(predict_step, in_shardings=(replicated, data), out_shardings=data),
    )
