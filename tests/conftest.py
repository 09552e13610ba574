from __future__ import annotations

import pytest

from tests._redis import *


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on both event loops."""
    name: str = request.param
    return name
