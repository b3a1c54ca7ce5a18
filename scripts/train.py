"""Trains one ranker with one optimizer on one dataset, on one device or under a `tf.distribute` strategy.

    .venv/bin/python scripts/train.py --dataset movielens_100k --preset small --scale 0.125 --method clippy \
        --learning-rate 0.05 --batch-size 256 --epochs 2 --strategy mirrored \
        --checkpoint-dir /tmp/run/ckpt --log-dir /tmp/run/logs
    .venv/bin/python scripts/train.py --dataset census_income --bottom mmoe --num-experts 4 --scale 0.125 \
        --metrics-out /tmp/run/metrics.json --export-dir /tmp/run/serving

The model: `--preset` (default small) or `--config FILE` (a `RankerConfig` YAML/JSON mapping, which may name a
"preset" to start from), then the model flags (`--bottom`, `--num-experts`, `--num-task-experts`, `--num-levels`,
`--bottom-units`, `--tower-units`, `--cross-layers`, ...) override single fields. The effective config is written
beside the checkpoints (`ranker_config.json`, loadable with `--config`); a rerun resumes with it (model flags, if
any, apply to it), and a rerun that would make another model is refused.

After each epoch and at the end, the ranker is evaluated on the held-out split (validation where the dataset has
one, else test): AUC per binary task and RMSE per regression task are printed, and every evaluated metric goes to
History and TensorBoard as `val_<metric>` / `test_<metric>` (see `experiments/train_eval.py`). `--metrics-out
FILE` writes them with the config, steps and wall time as JSON; the last line printed sums the run up.
`--export-dir DIR` writes the serving SavedModel (`serving_default`: raw features in, one prediction per task out).

The rankers need Keras 2 (TFRS), so this script sets TF_USE_LEGACY_KERAS=1 itself. Strategies:
- `default`: one device.
- `mirrored`: every local GPU, or with `--virtual-cpus K` the CPU split into K logical devices.
- `multi_worker`: MultiWorkerMirroredStrategy; run the same command on every worker of TF_CONFIG's cluster.
- `parameter_server`: run the same command on every task of TF_CONFIG's cluster (workers and parameter servers
  serve; the chief trains), or `--local-cluster W,P` for W workers and P parameter servers in this process.
  Variables larger than `--ps-min-shard-bytes` are sharded over the parameter servers.
- `tpu`: `--tpu` (or TPU_NAME) names the TPU; fails with "no TPU reachable: ..." when there is none.

Every strategy trains on the same global batches: `--batch-size` is the global batch, split over the replicas.
Batches are full (the remainder of the stream is dropped), so shapes are static as TPUs need.

With `--checkpoint-dir`, the model, the optimizer (slots and step count) and the position in the data (the step:
one batch per step) are saved every `--checkpoint-every` steps and at each epoch end, and a rerun of the same
command resumes from the latest checkpoint. With `--log-dir`, losses and metrics go to TensorBoard under
`<log-dir>` every `--log-every` steps (`batch/...`) and per epoch (`epoch/...`), with the optimizer's per-variable
clipping factors (`clipping_factor/...`). Under ParameterServerStrategy, which runs no per-batch callback,
checkpoints and logs are per epoch only.

The pieces live in `scripts/experiments/`: the flags (`train_flags`), the strategies (`strategies`), the data,
model and optimizer (`run_setup`), the callbacks (`callbacks`), the loop (`training`) and what a run reports and
exports (`train_eval`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

os.environ["TF_USE_LEGACY_KERAS"] = "1"  # the rankers are tfrs.Models: Keras 2 only

from experiments.strategies import TPUUnavailableError  # noqa: E402
from experiments.train_flags import parse_args  # noqa: E402
from experiments.training import TrainingRun, train  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> TrainingRun:
    args = parse_args(argv, description=__doc__.split("\n\n")[0])
    try:
        return train(args)
    except TPUUnavailableError as error:
        raise SystemExit(f"train.py: {error}") from None


if __name__ == "__main__":
    main()
