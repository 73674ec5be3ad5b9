import os

from hypothesis import settings

# CI runs more examples; local runs stay quick.
settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=20, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: whole training jobs, searches or servers in subprocesses (`make test` runs them; "
        "both legs of the wheel check leave them out, see .ci/wheel-check.sh)")
