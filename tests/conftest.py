import os
import sys

import pytest

# tests/reference.py is imported as a plain module by the test files.
sys.path.insert(0, os.path.dirname(__file__))

# CI runs a fixed sequence of examples (derandomize), so a submission's result
# does not depend on the draw; local runs keep exploring new examples, and
# whatever they find becomes an @example.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")


@pytest.fixture
def model_target_calls(monkeypatch):
    """``spy(module) -> list``: one entry per ``model_target`` call ``module`` makes outside its AWQ scale search
    (whose grid runs GPTQ, and so ``model_target``, once per point; awq+gptq's search is not what is counted)."""

    def spy(module):
        calls, searching = [], []
        real_target, real_search = module.model_target, module.search_scale

        def search(*args, **kwargs):
            searching.append(1)
            try:
                return real_search(*args, **kwargs)
            finally:
                searching.pop()

        def target(*args, **kwargs):
            if not searching:
                calls.append(1)
            return real_target(*args, **kwargs)

        monkeypatch.setattr(module, "search_scale", search)
        monkeypatch.setattr(module, "model_target", target)
        return calls

    return spy
