"""Installs tfrs-clippy: the library (`tfrs_clippy`) and the multitask rankers (`models/`, as `tfrs_clippy_models`)."""

import setuptools

setuptools.setup(
    name="tfrs-clippy",
    version="0.1.0",
    description="Clippy (adaptive update clipping) and stability tools for multitask ranking models in TensorFlow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The rankers live in models/ (the layout) but install as `tfrs_clippy_models`: a top-level `models` is a name
    # other distributions install too, and whichever came first on sys.path would silently win.
    packages=[*setuptools.find_packages(include=["tfrs_clippy", "tfrs_clippy.*"]), "tfrs_clippy_models"],
    package_dir={"tfrs_clippy_models": "models"},
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "tensorflow-recommenders==0.7.7",
        "keras>=3.10",
        "tensorboard==2.21.*",
        "numpy",
        "pyyaml",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "scipy"],  # scipy: an independent solver in tests/numpy_oracle.py
        # Keras 3's JAX backend (CPU wheels), keras-rs (scripts/keras_rs_ranker.py), optax (bench_backends.py).
        "jax": ["jax[cpu]==0.10.2", "keras-rs==0.4.0", "optax==0.2.8"],
    },
)
