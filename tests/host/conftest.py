"""Host-side tests of the sandbox itself: they boot sandboxes and check the host afterwards."""

from __future__ import annotations

import os

import pytest

from tests.sandbox import sandbox as sandbox_mod


def pytest_collection_modifyitems(items):
    reason = None
    if os.geteuid() != 0:
        reason = "the sandbox needs root (namespaces, mounts, cgroups)"
    elif os.environ.get("GPUJOBD_IN_SANDBOX"):
        reason = "sandbox hygiene is checked from the host, not from inside a sandbox"
    if reason:
        for item in items:
            if "tests/host/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def sandbox_module():
    return sandbox_mod
