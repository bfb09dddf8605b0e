import os
import sys

# tests/reference.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(__file__))

# CI runs a fixed sequence of examples (derandomize), so a submission's result
# does not depend on the draw; local runs keep exploring new examples, and
# whatever they find becomes an @example.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")
