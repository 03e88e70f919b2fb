"""The examples gallery runs and saves its figures."""

import importlib
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.thorough

pytest.importorskip("matplotlib")
EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.parametrize(
    "name",
    [
        "alignment",
        "background_removal",
        "equalization",
        "local_contrast",
        "distributed_job",
    ],
)
def test_example_saves_its_figure(name, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = importlib.import_module(name)
    module.main(["--out", str(tmp_path)])
    assert any(p.suffix == ".png" and p.stat().st_size > 0 for p in tmp_path.iterdir())
    sys.modules.pop(name, None)
