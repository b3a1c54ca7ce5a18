"""What `scripts/train.py` reports and leaves behind: held-out evaluation, the metrics file, the serving export.

Used by `experiments.training`, train.py's loop; importers set TF_USE_LEGACY_KERAS=1 before TensorFlow is imported.

- **Held-out split**: the validation split where the dataset has one (Census-Income), else the test split
  (MovieLens-100K, synthetic), so that a dataset's test split is read only when nothing else is held out.
- **Evaluation**: `model.evaluate` on the whole split in order, batched as training is: the ranker's metrics
  (AUC per binary task, RMSE per regression task, and the per-task losses and gate means). After each epoch the
  results join the epoch logs as `val_<metric>` (validation) or `test_<metric>` (test), so History, the TensorBoard
  logger and the metrics file get them, and the per-task line is printed.
- **Strategies**: the default, Mirrored and TPU strategies evaluate the model in place; MultiWorkerMirrored
  evaluates on every worker (evaluation is collective there) and only the chief prints and writes files.
  ParameterServerStrategy's `evaluate` schedules batches on workers with no exactly-once guarantee, so the chief
  (the coordinator, the only task that runs `train`) copies the weights into a one-device ranker and evaluates
  that: the numbers are those of the checkpoint restored on one device. That copy must live and run outside the
  strategy's scope, and `fit` runs its callbacks inside it: so there `train` fits one epoch at a time and calls
  `HeldOutEvaluation.after_fit` between the fits, which the callback's `on_epoch_end` leaves to it.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Mapping, Optional

import tensorflow as tf

import tfrs_clippy_models as models
from tfrs_clippy import data
from tfrs_clippy.keras_runtime import keras

SPLIT_PREFIXES = {"validation": "val_", "test": "test_"}
"""Prefix of the held-out metrics in the epoch logs, History and TensorBoard (Keras's own `val_` for validation)."""


def task_metric_names(spec: data.DatasetSpec) -> list[str]:
    """The metric reported per task, in spec order: `<task>_auc` for a binary task, `<task>_rmse` for regression."""
    return [f"{task.name}_auc" if task.kind == "binary" else f"{task.name}_rmse" for task in spec.tasks]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process prints and writes files: false only on a MultiWorkerMirrored non-chief worker."""
    return bool(strategy.extended.should_checkpoint)


def uses_coordinator(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.experimental.ParameterServerStrategy)


class HeldOut:
    """The held-out split of a dataset and how it is evaluated.

    Args:
        splits: The dataset's splits.
        batch_size: The evaluation batch (the global batch, split over replicas as in training).
        strategy: The training strategy.
        config: The ranker's config (for the one-device copy under ParameterServerStrategy).
        drop_remainder: Drop the last partial batch (TPUs need static shapes; `examples` then counts fewer).
    """

    def __init__(self, splits: data.Splits, batch_size: int, strategy: tf.distribute.Strategy,
                 config: models.RankerConfig, drop_remainder: bool = False) -> None:
        self.split = "validation" if splits.validation is not None else "test"
        self.dataset = splits.validation if splits.validation is not None else splits.test
        size = int(self.dataset.cardinality())
        if size < 1:
            raise ValueError(f"the {splits.name} dataset's {self.split} split is empty: nothing to evaluate on.")
        self.examples = size - size % batch_size if drop_remainder else size
        if self.examples < 1:
            raise ValueError(f"--batch-size {batch_size} exceeds the {size} held-out examples ({self.split}).")
        self.prefix = SPLIT_PREFIXES[self.split]
        self.spec = splits.spec
        self.batch_size = batch_size
        self.strategy = strategy
        self.drop_remainder = drop_remainder
        self._local_model: Optional[models.Ranker] = None
        if uses_coordinator(strategy):
            # Built here, outside the strategy's scope (see the module docstring): a plain one-device ranker.
            self._local_model = models.build_ranker(splits.spec, config)
            self._local_model.compile()  # `evaluate` needs a compiled model; its optimizer is never used

    def batches(self) -> tf.data.Dataset:
        """The split in time order, in batches of `batch_size`."""
        return data.make_pipeline(self.dataset, self.batch_size, drop_remainder=self.drop_remainder)

    def evaluation_model(self, model: models.Ranker) -> models.Ranker:
        """`model` itself, or under ParameterServerStrategy a one-device copy holding its current weights."""
        if self._local_model is None:
            return model
        # Through a checkpoint, because it joins the shards of a sharded variable (tested by test_train_script).
        with tempfile.TemporaryDirectory() as directory:
            path = tf.train.Checkpoint(model=model).write(str(pathlib.Path(directory) / "weights"))
            tf.train.Checkpoint(model=self._local_model).read(path).expect_partial()
        return self._local_model

    def evaluate(self, model: models.Ranker) -> dict[str, float]:
        """Every metric of `model` on the whole split (`model.evaluate`), read from the metric objects.

        Read from the metrics, not from `evaluate`'s returned dict: TFRS's test step also returns the last batch's
        loss, so Keras returns the last step's values, which under MultiWorkerMirrored it sums over the workers
        (an AUC of 1.13 for 0.57 on 2 workers). The metric objects hold the whole split's state, aggregated over
        every replica: the per-task losses, AUCs, RMSEs and gate means.
        """
        target = self.evaluation_model(model)
        target.evaluate(self.batches(), verbose=0)
        return {name: float(value) for name, value in target.get_metrics_result().items()}

    def task_metrics(self, results: Mapping[str, float]) -> dict[str, float]:
        """The per-task metrics (AUC or RMSE) of `evaluate`'s results, in spec order."""
        return {name: results[name] for name in task_metric_names(self.spec)}

    def describe(self, results: Mapping[str, float]) -> str:
        """'validation, 49,881 examples: income_50k_auc 0.9400, never_married_auc 0.9800'."""
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in self.task_metrics(results).items())
        return f"{self.split}, {self.examples:,} examples: {metrics}"


class HeldOutEvaluation(keras.callbacks.Callback):
    """Evaluates on the held-out split at each epoch end; adds the results to the logs; prints them on the chief.

    It must come before the callbacks that write the logs (TensorBoard), and after the progress bar so that its
    line follows the epoch's. `records` holds one entry per evaluation: epoch, step and results.
    """

    def __init__(self, held_out: HeldOut, step: Callable[[], int], chief: bool) -> None:
        super().__init__()
        self.held_out = held_out
        self.step = step
        self.chief = chief
        self.records: list[dict[str, Any]] = []

    def evaluate_now(self, model: models.Ranker, epoch: Optional[int]) -> dict[str, float]:
        """Evaluates `model` at its current step, records and prints the results (epoch None: after training)."""
        step = self.step()
        if self.records and self.records[-1]["step"] == step:
            return self.records[-1]["results"]  # the weights have not moved since
        results = self.held_out.evaluate(model)
        self.records.append({"epoch": epoch, "step": step, "results": results})
        if self.chief:
            when = f"after epoch {epoch}" if epoch is not None else "at the end"
            print(f"held-out {when} (step {step}): {self.held_out.describe(results)}", flush=True)
        return results

    def prefixed(self, results: Mapping[str, float]) -> dict[str, float]:
        """`results` named as in the logs: `val_<metric>` or `test_<metric>`."""
        return {self.held_out.prefix + name: value for name, value in results.items()}

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if uses_coordinator(self.held_out.strategy):
            return  # inside the strategy's scope: `train` calls `after_fit` instead
        results = self.evaluate_now(self.model, epoch + 1)
        if logs is not None:
            # The dict the later callbacks (TensorBoard logger, History) receive: Keras passes one dict to all.
            logs.update(self.prefixed(results))

    def after_fit(self, model: models.Ranker, epoch: int) -> dict[str, float]:
        """ParameterServerStrategy: evaluates after a one-epoch `fit`; returns the results named as in the logs."""
        return self.prefixed(self.evaluate_now(model, epoch))


def write_metrics(path: str, held_out: HeldOut, evaluation: HeldOutEvaluation, final: Mapping[str, float],
                  summary: Mapping[str, Any]) -> None:
    """Writes the `--metrics-out` JSON: `summary` (config, steps, wall time, ...) and the held-out metrics.

    Raises:
        ValueError: the file cannot be written; the message names `--metrics-out` and the path.
    """
    record = {
        **summary,
        "held_out_split": held_out.split,
        "held_out_examples": held_out.examples,
        "held_out": held_out.task_metrics(final),
        "held_out_all": dict(final),
        "held_out_per_epoch": [
            {"epoch": r["epoch"], "step": r["step"], **held_out.task_metrics(r["results"])}
            for r in evaluation.records if r["epoch"] is not None
        ],
    }
    target = pathlib.Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    except OSError as error:
        raise ValueError(f"--metrics-out {path}: cannot write it: {error}") from None


def export(model: models.Ranker, held_out: HeldOut, directory: str, chief: bool) -> None:
    """Writes the serving SavedModel (`Ranker.export`) of the model's current weights at `directory`.

    Under MultiWorkerMirrored every worker saves (saving may run collectives), non-chiefs into a temporary
    directory that is then removed. Under ParameterServerStrategy the chief exports its one-device copy, so the
    SavedModel holds plain, unsharded variables.

    Raises:
        ValueError: the SavedModel cannot be written; the message names `--export-dir` and the path.
    """
    target = held_out.evaluation_model(model)
    scratch = None if chief else tempfile.mkdtemp(prefix="train_export_")
    try:
        target.export(directory if chief else scratch)
    except (OSError, tf.errors.OpError) as error:
        raise ValueError(f"--export-dir {directory}: cannot write the SavedModel: {error}") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

