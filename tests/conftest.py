"""Shared by every test: nothing writes into the user's real cache folder."""

import pytest


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Inception weights and reference statistics go to a folder of this test session, not ~/.cache/tdiff."""
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tdiff-cache"))
