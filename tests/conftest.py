"""Shared pytest set-up: slow learning tests run only with --runslow (the full suite)."""
import os
import sys

import pytest

# tests import the flat project files (data.py, coswin.py, ...) from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the slow learning tests (the full suite)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long learning test, run only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run the full suite with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
