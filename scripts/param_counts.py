"""Prints (and optionally writes) a Markdown table of the presets' parameter counts on ML-100K and synthetic data.

Each model is built for real from the dataset's spec and its trainable variables are counted: embedding tables
apart from everything else ("non-embedding", the number the paper reports). The paper's own numbers, at its
(unpublished) input width, are printed beside ours.

    TF_USE_LEGACY_KERAS=1 .venv/bin/python scripts/param_counts.py --scales 1 0.125 --output param_counts.md
"""

from __future__ import annotations

import argparse
import pathlib

import tfrs_clippy_models as models
from tfrs_clippy.data import DatasetSpec, movielens_100k, synthetic
from tfrs_clippy.keras_runtime import keras

PAPER_NON_EMBEDDING = {"small": 7.5e6, "large": 57.0e6, "large_dcn": 68.0e6}
"""Clippy (Tang et al. 2023), section 5: non-embedding parameters of Small, Large and Large+DCN."""


def _millions(count: float) -> str:
    return f"{count / 1e6:.2f}M"


def count_rows(dataset: str, spec: DatasetSpec, scales: list[float]) -> list[str]:
    """One Markdown row per preset and scale, each counted on a freshly built model."""
    rows = []
    for scale in scales:
        for preset in models.PRESETS:
            model = models.build_ranker(spec, models.RankerConfig.preset(preset, scale=scale))
            counts = model.parameter_counts()
            rows.append(
                f"| {dataset} | {preset} | {scale:g} | {model.embedding.output_dim} | "
                f"{_millions(counts.non_embedding)} | {_millions(counts.embedding)} | "
                f"{_millions(PAPER_NON_EMBEDDING[preset]) if scale == 1 else ''} |"
            )
            print(rows[-1], flush=True)
            del model
            keras.backend.clear_session()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="width multipliers to count")
    parser.add_argument("--output", type=pathlib.Path, help="also write the Markdown table to this file")
    args = parser.parse_args()

    header = [
        "| data | preset | scale | input width | non-embedding | embedding | paper non-embedding |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    specs = {
        "MovieLens-100K": movielens_100k().spec,
        "synthetic (defaults)": synthetic(num_train=1, num_test=0).spec,
    }
    rows = [row for dataset, spec in specs.items() for row in count_rows(dataset, spec, args.scales)]
    if args.output:
        args.output.write_text("\n".join(header + rows) + "\n", encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
