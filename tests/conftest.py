"""Hypothesis profiles: a quick one for local runs, a thorough one for CI.

CI (`CI=true`) loads "ci"; anything else loads "quick". `HYPOTHESIS_PROFILE`
picks one by name, e.g. `HYPOTHESIS_PROFILE=ci python -m pytest tests/test_api.py`
to search as thoroughly as CI does, and so does pytest's
`--hypothesis-profile` option.
"""

import os

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
