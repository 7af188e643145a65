"""Random-generator states round-trip through the manifest as plain JSON, and anything else is refused."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from parallel_yolo.checkpoint import CheckpointError, rng


def _draws():
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()), \
        torch.rand(3).tolist()


def test_states_round_trip_through_json():
    random.gauss(0, 1), np.random.randn()  # cached Gaussians (Python's gauss_next, numpy's has_gauss) are kept too
    saved = json.loads(json.dumps(rng.capture()))
    expected = _draws()
    _draws()
    rng.restore(saved)
    assert _draws() == expected


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("torch"),
    lambda s: s["python"].update(words=s["python"]["words"][:-8]),
    lambda s: s["numpy"].update(pos=10_000),
    lambda s: s.update(torch="not base64!"),
    lambda s: s.update(torch=[1, 2, 3]),
    lambda s: s["python"].update(gauss_next="0.5"),
], ids=["missing", "short", "pos", "bad-base64", "list", "type"])
def test_malformed_states_are_refused_before_touching_the_generators(damage):
    state = rng.capture()
    damage(state)
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="random-generator states"):
        rng.restore(state)
    assert torch.equal(torch.get_rng_state(), before)
