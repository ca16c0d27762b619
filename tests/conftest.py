import pytest

from gloo import GlooGroup

_groups: dict[int, GlooGroup] = {}


@pytest.fixture(scope="session")
def gloo_group():
    """``gloo_group(world_size)``: a started group of that size, shared by every test of the session."""

    def get(world_size: int) -> GlooGroup:
        if world_size not in _groups:
            _groups[world_size] = GlooGroup(world_size)
        return _groups[world_size]

    yield get
    for group in _groups.values():
        group.close()
    _groups.clear()
