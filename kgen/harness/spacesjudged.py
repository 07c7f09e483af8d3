"""One line at the end of `kgen test --kernel`: which spaces the page-table checks judged, and which space was live
when the ready point stopped the machine (kgen/guest/ownspace.py `judged_spaces`). A ready point that races the
kernel's process switches lands in a different space from run to run; the checks judge the kernel's own space every
time, and this line says where the ready point came, so two runs can be told apart without a different verdict.

A plugin object of its own (registered by kgen/harness/pytest_plugin.py for a kernel given with --kgen-kernel): a
test's report carries the text (`kgen_ready_space`, a plain attribute pytest-xdist takes from a worker to the process
that reports), the terminal summary prints each text once.
"""
from __future__ import annotations

import pytest


class SpacesJudged:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        if call.when != "call" or "kgen_space" not in getattr(item, "funcargs", {}):
            return
        live, space = item.funcargs.get("kgen_idle"), item.funcargs.get("kgen_space")
        from kgen.guest.ownspace import OwnSpaceSlot, judged_spaces
        if live is None or space is not None and not isinstance(space, OwnSpaceSlot):
            return
        try:
            text = judged_spaces(live.view())[1]
        except Exception:  # noqa: BLE001 - the machine is gone or unreadable: the test's own report says why; this
            return         # line must never turn a verdict into an internal error
        outcome.get_result().kgen_ready_space = text

    def pytest_terminal_summary(self, terminalreporter):
        texts = dict.fromkeys(getattr(report, "kgen_ready_space", None)
                              for outcome in ("passed", "failed", "skipped")
                              for report in terminalreporter.stats.get(outcome, ()))
        for text in texts:
            if text:
                terminalreporter.write_line(f"kgen: page-table checks: {text}")
