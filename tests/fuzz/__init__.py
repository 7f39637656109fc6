"""Property tests (Hypothesis) for every parser of outside input: no crash, no hang, a clean
error for whatever comes in. Two profiles: "ci" (the default: a few hundred cases per parser,
seconds in all, run by the README's test command) and "long" (`MAILDETOUR_FUZZ=long`: 20,000
cases per parser, for docs/reliability.md; see there how to run it). The corpus of inputs that
once mattered is kept as `@example`s next to each property, so every run tries them first.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("long" if os.environ.get("MAILDETOUR_FUZZ") == "long" else "ci")
