"""The rankers install as `tfrs_clippy_models`, so another distribution's top-level `models` cannot shadow them."""

import os
import pathlib
import subprocess
import sys

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def test_a_foreign_models_package_first_on_the_path_does_not_shadow_the_rankers(tmp_path):
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("raise ImportError('the foreign models package was imported')\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import tfrs_clippy_models as models\n"
            "print(models.__file__); print(callable(models.build_ranker))\n")
    process = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                             timeout=300, cwd=tmp_path, env={**os.environ, "TF_USE_LEGACY_KERAS": "1"})
    assert process.returncode == 0, process.stderr[-2000:]
    location, has_builder = process.stdout.split()
    assert pathlib.Path(location) == REPOSITORY / "models" / "__init__.py"
    assert has_builder == "True"
