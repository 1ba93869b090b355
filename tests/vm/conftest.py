"""Fixtures for tests that boot a QEMU guest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers.vm import require_vm

from testbed.vm import GuestConfig, GuestVM


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestVM]:
    """One guest with every device, shared by the tests of a module (a boot takes ~20 s)."""
    require_vm()
    with GuestVM(tmp_path_factory.mktemp("vm"), GuestConfig()) as vm:
        yield vm


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the guest console to a failing test's report: the kernel's view of why."""
    outcome = yield
    report = outcome.get_result()
    funcargs = getattr(item, "funcargs", {})
    vm = funcargs.get("guest")
    if report.failed and isinstance(vm, GuestVM):
        report.sections.append(("guest console", vm.console_tail(80)))
    # End-to-end fixtures say what the agent and the host peer were doing.
    diagnostics = getattr(funcargs.get("e2e"), "diagnostics", None)
    if report.failed and callable(diagnostics):
        try:
            report.sections.append(("agent and host peer", diagnostics()))
        except Exception as err:  # the guest may be gone: keep the original failure
            report.sections.append(("agent and host peer", f"unavailable: {err}"))
