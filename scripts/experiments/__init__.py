"""Code the experiment scripts share; each script is a thin command line over it.

- `records`: run records on disk, their keys, and the small formats of tables.
- `flags`: argparse types and checks of flag values.
- `runs`: one run of the optimizer comparison and the cached runner (`reproduce.py`, `calibrate_lr.py`).
- `paper_tables`: the reproduction's paper-shaped tables and plots.
- `train_flags`, `strategies`, `run_setup`, `callbacks`, `training`, `train_eval`: `train.py`'s flags, its
  `tf.distribute` strategies, what a run is built from, its callbacks, its loop, and what it reports and exports.

Scripts run as `python scripts/<name>.py`, which puts `scripts/` first on `sys.path`: `import experiments` needs no
path editing. Library code never imports this package.
"""
