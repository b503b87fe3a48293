"""Fixtures and collection hooks. Helpers that test files import live in _helpers.py (golden
data) and _d2_helpers.py (tiny Detectron2 backbones and batches)."""
import os

import pytest
import torch


@pytest.fixture
def rev_backward_calls(monkeypatch):
    """A list that gets one entry per call of the reversible engine's backward (proof that a
    test's gradients came through RevBackProp, not plain autograd)."""
    from revvit_d2.modeling.reversible import RevBackProp

    calls = []
    original = RevBackProp.backward

    def spy(ctx, *grads):
        calls.append(1)
        return original(ctx, *grads)

    monkeypatch.setattr(RevBackProp, "backward", staticmethod(spy))
    return calls


@pytest.fixture(autouse=True)
def _fixed_threads():
    # Keep CPU tests deterministic and friendly to 2-core CI machines.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not the keyword: a parameter id "cuda" is a keyword too
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
