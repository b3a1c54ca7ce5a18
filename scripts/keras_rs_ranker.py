"""A small DCN-v2 ranker from keras-rs's `FeatureCross`, trained with ClippyAdagrad on any Keras 3 backend.

    KERAS_BACKEND=jax python scripts/keras_rs_ranker.py                    # MovieLens-100K, one pass
    KERAS_BACKEND=tensorflow python scripts/keras_rs_ranker.py --dataset synthetic --train-examples 4096

Every feature gets an embedding (multi-hot: the mean of its ids'), the numeric ones are standardized; two
`keras_rs.layers.FeatureCross` layers cross the concatenation x0 with itself (x_{l+1} = x0 * (W x_l + b) + x_l), a
ReLU layer follows, and each task has a head (binary: a logit, regression: a value) starting at its label prior.
The weights are drawn from NumPy (not Keras's backend-specific random streams) and the data is fed in time order,
so the run computes the same numbers on TensorFlow, JAX and PyTorch, to float rounding: the test compares them.
Prints one line per epoch and writes JSON (per-task held-out AUC / RMSE, the training loss, ClippyAdagrad's
clipping factors, digests of the final weights) to --out, and rewrites table.md beside it from every run there
(one row per backend).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

from experiments.records import commit, stderr_silenced

with stderr_silenced():  # TensorFlow's C++ start-up lines (tfrs_clippy.data reads the data with tf.data)
    import keras
    import keras_rs
    import numpy as np

    import tfrs_clippy
    from tfrs_clippy import data


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=["movielens_100k", "synthetic"], default="movielens_100k")
    parser.add_argument("--train-examples", type=int, default=0, help="use only the first N training examples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--cross-layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="JSON file (default results/keras_rs/<dataset>_<backend>.json)")
    return parser.parse_args(argv)


def load(dataset: str, train_examples: int):
    """(spec, train arrays, test arrays); each arrays value is (features, labels) dicts of NumPy arrays."""
    splits = (data.movielens_100k() if dataset == "movielens_100k"
              else data.synthetic(num_train=20_000, num_test=4_000, vocabulary_sizes=(1_000, 10_000), seed=0))
    train = splits.train.take(train_examples) if train_examples else splits.train

    def arrays(split):
        features, labels = next(iter(data.make_pipeline(split, batch_size=len(split))))
        return ({k: v.numpy() for k, v in features.items()}, {k: v.numpy() for k, v in labels.items()})

    return splits.spec, arrays(train), arrays(splits.test)


class Features(keras.layers.Layer):
    """x0: every feature's embedding (multi-hot: the mean over its non-zero ids) and the standardized numerics."""

    def __init__(self, spec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self.tables = {f.name: keras.layers.Embedding(f.vocabulary_size, f.embedding_dim, name=f"{f.name}_embedding")
                       for f in spec.features if f.kind in ("categorical", "multi_hot")}

    def call(self, features):
        parts = []
        for feature in self.spec.features:
            values = features[feature.name]
            if feature.kind == "numeric":
                parts.append(keras.ops.reshape((keras.ops.cast(values, "float32") - feature.mean) / feature.std,
                                               (-1, feature.dim)))
                continue
            ids = keras.ops.reshape(keras.ops.cast(values, "int32"), (-1, feature.max_length))
            vectors = self.tables[feature.name](ids)
            present = keras.ops.expand_dims(keras.ops.cast(ids > 0, "float32"), -1)
            if feature.kind == "categorical":
                present = keras.ops.ones_like(present)  # id 0 is the out-of-vocabulary id, a real value here
            parts.append(keras.ops.sum(vectors * present, axis=1) / keras.ops.maximum(keras.ops.sum(present, 1), 1.0))
        return keras.ops.concatenate(parts, axis=-1)


def build_model(spec, cross_layers: int, hidden: int) -> keras.Model:
    inputs = {f.name: keras.Input((f.max_length if f.kind == "multi_hot" else f.dim,), name=f.name,
                                  dtype="float32" if f.kind == "numeric" else "int32") for f in spec.features}
    x0 = Features(spec, name="features")(inputs)
    x = x0
    for i in range(cross_layers):
        x = keras_rs.layers.FeatureCross(name=f"cross_{i}")(x0, x)
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(x)
    outputs = {t.name: keras.layers.Dense(1, name=t.name)(x) for t in spec.tasks}
    return keras.Model(inputs, outputs)


def initialize(model: keras.Model, spec, seed: int) -> None:
    """Weights from NumPy, the same on every backend: Glorot-uniform kernels, N(0, 0.05) embeddings, zero biases,
    and each head's bias at its task's prior (the logit of the positive rate, the mean rating)."""
    rng = np.random.default_rng(seed)
    priors = {t.name: (np.log(t.label_mean / (1 - t.label_mean)) if t.kind == "binary" else t.label_mean)
              for t in spec.tasks}
    for weight in model.weights:
        shape = tuple(weight.shape)
        if "embedding" in weight.path:
            value = rng.normal(0.0, 0.05, shape)
        elif len(shape) == 2:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            value = rng.uniform(-limit, limit, shape)
        else:
            head = weight.path.split("/")[0]
            value = np.full(shape, priors[head]) if head in priors else np.zeros(shape)
        weight.assign(value.astype("float32"))


def losses(spec) -> dict:
    return {t.name: keras.losses.BinaryCrossentropy(from_logits=True) if t.kind == "binary"
            else keras.losses.MeanSquaredError() for t in spec.tasks}


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula; tied scores share their mean rank."""
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[group]
    positives = labels > 0.5
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: keras.Model, spec, test) -> dict:
    features, labels = test
    predictions = model.predict(features, batch_size=4096, verbose=0)
    metrics = {}
    for task in spec.tasks:
        y, p = labels[task.name].reshape(-1), np.asarray(predictions[task.name]).reshape(-1)
        metrics[task.name] = ({"auc": auc(y, p)} if task.kind == "binary"
                              else {"rmse": float(np.sqrt(np.mean((y - p) ** 2)))})
    return metrics


def write_table(folder: pathlib.Path) -> pathlib.Path:
    """table.md in `folder`: the last epoch of every run's JSON there, one row per file."""
    lines = ["| backend | dataset | epochs | held-out metrics (last epoch) | smallest clipping factor | skipped steps "
             "| seconds | command | commit |", "|---|---|---:|---|---:|---:|---:|---|---|"]
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        last = run["history"][-1]
        metrics = ", ".join(f"{task} {name} {value:.4f}" for task, values in last["test"].items()
                            for name, value in values.items())
        lines.append(f"| {run['backend']} | {run['config']['dataset']} | {last['epoch']} | {metrics} | "
                     f"{min(run['clipping_factors'].values()):.3f} | {run['nonfinite_steps']} | {run['seconds']:.0f} | "
                     f"`{run['command']}` | `{run['commit']}` |")
    table = folder / "table.md"
    table.write_text("\n".join(lines) + "\n")
    return table


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    backend = keras.backend.backend()
    started = time.time()
    with stderr_silenced():  # tf.data's and the CUDA probe's C++ log lines
        spec, train, test = load(args.dataset, args.train_examples)
    model = build_model(spec, args.cross_layers, args.hidden)
    initialize(model, spec, args.seed)
    optimizer = tfrs_clippy.ClippyAdagrad.from_paper(learning_rate=args.learning_rate, export_clipping_factors=True,
                                                    exclude_from_clipping=["embedding"])
    model.compile(optimizer=optimizer, loss=losses(spec))
    history = []
    for epoch in range(args.epochs):
        result = model.fit(train[0], train[1], batch_size=args.batch_size, epochs=1, shuffle=False, verbose=0)
        metrics = evaluate(model, spec, test)
        history.append({"epoch": epoch + 1, "train_loss": float(result.history["loss"][-1]), "test": metrics})
        elapsed = time.time() - started
        left = elapsed / (epoch + 1) * (args.epochs - epoch - 1)
        print(f"[keras_rs_ranker] {backend} epoch {epoch + 1}/{args.epochs}: loss {history[-1]['train_loss']:.4f}, "
              f"test {json.dumps(metrics)}; {elapsed:.0f} s, about {left:.0f} s left", flush=True)
    weights = [keras.ops.convert_to_numpy(w).astype(np.float64) for w in model.weights]
    report = {
        "backend": backend, "command": " ".join(["KERAS_BACKEND=" + backend, "python scripts/keras_rs_ranker.py",
                                                  *map(shlex.quote, argv)]),
        "commit": commit(), "config": {k: str(v) for k, v in vars(args).items()}, "history": history,
        "clipping_factors": {k: float(keras.ops.convert_to_numpy(v))
                             for k, v in optimizer.clipping_factors_by_name().items()},
        "nonfinite_steps": int(keras.ops.convert_to_numpy(optimizer.nonfinite_steps)),
        "weight_sums": {w.path: float(np.abs(v).sum()) for w, v in zip(model.weights, weights, strict=True)},
        # Values at five fixed positions of each weight: signs and positions, which sums of magnitudes cannot see.
        "weight_probes": {w.path: [float(v.flat[i]) for i in np.linspace(0, v.size - 1, 5).astype(int)]
                          for w, v in zip(model.weights, weights, strict=True)},
        "seconds": time.time() - started,
    }
    out = args.out or pathlib.Path("results/keras_rs") / f"{args.dataset}_{backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"[keras_rs_ranker] wrote {out} and {write_table(out.parent)}")
    return report


if __name__ == "__main__":
    main()
