"""Fixtures for explanation tests: one local Anthropic-compatible server for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.service.explain.fake_anthropic import FakeAnthropicServer


@pytest.fixture(scope="session")
def fake_anthropic() -> Iterator[FakeAnthropicServer]:
    """The Messages API on a free loopback port; each test scripts a scenario of its own."""
    server = FakeAnthropicServer()
    server.start()
    yield server
    server.stop()
