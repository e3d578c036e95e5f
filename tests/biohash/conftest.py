"""Fixtures shared by the biohash test modules: a small FlyVec model trained once per module."""

from __future__ import annotations

import pytest

from kexue import flyvec
from tests.biohash.helpers import SMALL, topic_corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("flyvec")
    model = flyvec.train(topic_corpus(), out, SMALL, progress=False)
    return out, model
