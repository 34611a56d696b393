"""Shared fixtures: the warm gloo pool (`dist_run`) and the `full` marker for the larger test matrices."""

import os

import pytest

from tests.pool import PoolSet


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=os.environ.get("MEGAMOE_TEST_FULL") == "1",
                     help="also run tests marked `full` (the larger matrices; `make test-full`)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: part of the larger matrix, run by `make test-full` only")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="larger matrix: run with `make test-full`")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dist_run():
    """dist_run(world_size, fn, *args, timeout=..., **kwargs) -> per-rank results of fn on warm gloo ranks.

    fn must be a module-level function of an importable module (tests.*). Pools are kept for the whole session.
    """
    pools = PoolSet()
    yield pools
    pools.close()
