"""What a `scripts/train.py` run is built from, given its flags and strategy: the data splits, the global batches
`fit` takes, the compiled ranker with its optimizer, and the checkpoint that holds them.

Importers set TF_USE_LEGACY_KERAS=1 before TensorFlow is imported (the rankers need Keras 2).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

import tensorflow as tf

import tfrs_clippy
import tfrs_clippy_models as models
from tfrs_clippy import data
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import DEFAULT_SETTINGS, LinearWarmup


def load_splits(args: argparse.Namespace) -> data.Splits:
    """The splits of `--dataset` (the synthetic stream as the `--synthetic-*` flags and `--seed` make it)."""
    if args.dataset == "synthetic":
        # The test split is the stream after the training examples: its size changes no training example.
        return data.synthetic(
            num_train=args.synthetic_examples, num_test=args.synthetic_test_examples,
            vocabulary_sizes=args.synthetic_vocabulary, seed=args.seed,
        )
    return getattr(data, args.dataset)()


def build_optimizer(args: argparse.Namespace) -> Any:
    """The method with `--hparams` (default: `DEFAULT_SETTINGS`, the middle of the paper's grid), exporting factors
    if logging."""
    hyperparameters = dict(DEFAULT_SETTINGS[args.method] if args.hparams is None else args.hparams)
    learning_rate = LinearWarmup(args.learning_rate, args.warmup_steps) if args.warmup_steps else args.learning_rate
    try:
        return tfrs_clippy.build_optimizer(
            args.method, learning_rate, include_embeddings=args.include_embeddings,
            export_clipping_factors=args.log_dir is not None, **hyperparameters,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"--method {args.method} --hparams {json.dumps(hyperparameters)}: {error}") from None


def build_model_and_optimizer(args: argparse.Namespace, spec: data.DatasetSpec,
                              strategy: tf.distribute.Strategy) -> tuple[models.Ranker, Any]:
    """The compiled ranker of `args.ranker_config` and its optimizer, slots built, all under `strategy`'s scope.

    Slots are built here rather than in the first step: with several workers tracing the first step at once, each
    would try to create them.

    Raises:
        ValueError: the config does not fit the dataset (e.g. `task_weights` names a task it lacks).
    """
    keras.utils.set_random_seed(args.seed)
    with strategy.scope():
        try:
            model = models.build_ranker(spec, args.ranker_config)
        except ValueError as error:
            source = f"--config {args.config}" if args.config else "the model flags"
            raise ValueError(f"{source} on --dataset {args.dataset}: {error}") from None
        optimizer = build_optimizer(args)
        optimizer.build(model.trainable_variables)
        model.compile(optimizer=optimizer, steps_per_execution=args.steps_per_execution,
                      jit_compile=args.jit_compile)
    return model, optimizer


def make_checkpoint(model: models.Ranker, optimizer: Any) -> tf.train.Checkpoint:
    """What a checkpoint holds: the model, and the optimizer with its slots and step count (the data position)."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer)


def training_input(args: argparse.Namespace, strategy: tf.distribute.Strategy, skip: int,
                   train_examples: Optional[data.ChunkedExamples] = None) -> Any:
    """The global batches after the first `skip`, as `fit` takes them under `strategy`.

    `train_examples` is the training split if already loaded (else it is loaded: Census-Income takes ~20 s);
    under ParameterServerStrategy each worker loads its own.
    """

    def batches(examples: data.ChunkedExamples) -> tf.data.Dataset:
        return data.make_pipeline(
            examples, args.batch_size, shuffle_window=args.shuffle_window, seed=args.seed, epochs=args.epochs,
            drop_remainder=True,
        ).skip(skip)

    if isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy):
        # Each worker builds its own pipeline (a dataset made here could not be sent to it) and reads its shard,
        # repeated so that no worker runs dry while steps are still scheduled. Workers take steps as they come
        # free, so which examples a step reads is not fixed: a resumed run skips the same number of batches.
        def per_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            own = batches(load_splits(args).train)
            return own.shard(context.num_input_pipelines, context.input_pipeline_id).repeat()
        return keras.utils.experimental.DatasetCreator(per_worker)
    if train_examples is None:
        train_examples = load_splits(args).train
    if args.strategy == "default":
        return batches(train_examples)
    # Distributed explicitly, as `fit` would: each replica gets its contiguous slice of every global batch.
    return strategy.experimental_distribute_dataset(batches(train_examples))
