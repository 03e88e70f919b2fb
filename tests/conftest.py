"""Hypothesis profiles: a quick one for local runs, a thorough one for CI.

CI (`CI=true`) loads "ci"; anything else loads "quick". `HYPOTHESIS_PROFILE`
picks one by name, e.g. `HYPOTHESIS_PROFILE=ci python -m pytest tests/test_api.py`
to search as thoroughly as CI does, and so does pytest's
`--hypothesis-profile` option.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

# the reference is brute force: an example may take a while, and the
# strategies draw whole arrays
COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])

settings.register_profile("quick", max_examples=20, **COMMON)
settings.register_profile(
    "ci", max_examples=400, derandomize=False, print_blob=True, **COMMON
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE")
    or ("ci" if os.environ.get("CI") == "true" else "quick")
)


# Tests marked `thorough` (whole example scripts, clusters of processes,
# runs killed mid-write) run in CI (`CI=true`) or with `--thorough`; a local
# run skips them to stay quick.
THOROUGH = os.environ.get("CI") == "true"


def pytest_addoption(parser):
    parser.addoption("--thorough", action="store_true", help="run the thorough tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "thorough: slow tests run in CI or --thorough")


def pytest_collection_modifyitems(config, items):
    if THOROUGH or config.getoption("--thorough"):
        return
    skip = pytest.mark.skip(reason="thorough: runs in CI or with --thorough")
    for item in items:
        if "thorough" in item.keywords:
            item.add_marker(skip)
