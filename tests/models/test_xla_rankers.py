"""A full train step of every ranker preset with every optimizer compiles and runs under XLA (jit_compile=True).

On CPU, the nearest check available here for TPUs, which run every step through XLA. Every method runs on
Large+DCN, whose step holds every layer kind of the three presets (embeddings, cross layer, LayerNorm, bottom,
towers); ClippyAdagrad also on Small and Large. ClippyAdagrad's XLA steps are compared with the steps without XLA
from the same weights (same losses, weights within float32 tolerance). Compiling costs ~10 s a step on this
2-core machine, hence not the full 3 x 5 grid twice.
"""

import numpy as np
import pytest

import tfrs_clippy
import tfrs_clippy_models as models
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import METHODS, PAPER_GRIDS
from tfrs_clippy_models import RankerConfig

SCALE = 1 / 64  # widths 8 (small) and 64 (large): every layer of the preset, little compute
STEPS = 2


def _step(spec, weights, method: str, preset: str, jit_compile: bool, batch) -> tuple[list, list, object]:
    model = models.build_ranker(spec, RankerConfig.preset(preset, scale=SCALE))
    model.set_weights(weights)
    optimizer = tfrs_clippy.build_optimizer(
        method, 0.1, include_embeddings=True, export_clipping_factors=True, **PAPER_GRIDS[method][0]
    )
    model.compile(optimizer=optimizer, jit_compile=jit_compile)
    losses = [model.train_on_batch(*batch, return_dict=True)["loss"] for _ in range(STEPS)]
    return losses, [w.numpy() for w in model.trainable_variables], optimizer


CASES = [("large_dcn", method) for method in sorted(METHODS)] + [("small", "clippy"), ("large", "clippy")]


@pytest.mark.slow
@pytest.mark.parametrize("preset, method", CASES)
def test_train_step_compiles_and_runs_under_xla(tiny_spec, make_batch, preset, method):
    keras.utils.set_random_seed(0)
    initial = models.build_ranker(tiny_spec, RankerConfig.preset(preset, scale=SCALE)).get_weights()
    batch = make_batch(tiny_spec, size=32)
    xla_losses, xla_weights, optimizer = _step(tiny_spec, initial, method, preset, True, batch)
    assert np.all(np.isfinite(xla_losses))
    assert int(optimizer.iterations) == STEPS
    assert all(np.isfinite(float(f)) for f in optimizer.clipping_factors)
    if method == "clippy":
        graph_losses, graph_weights, _ = _step(tiny_spec, initial, method, preset, False, batch)
        np.testing.assert_allclose(xla_losses, graph_losses, rtol=1e-5)
        for ours, theirs in zip(xla_weights, graph_weights):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
