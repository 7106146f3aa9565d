"""A second run racing the first for its output lock (issue 31)."""

from __future__ import annotations

import contextlib


def run_before_the_lock(monkeypatch, module, other_run) -> list:
    """Make `other_run()` happen, start to finish, just before the job in `module` takes its output lock (as a
    second run started at the same moment would, issue 31): its outcome is appended to the returned list (the
    result, or the error it raised)."""
    real, outcomes = module.output_lock, []

    @contextlib.contextmanager
    def hooked(out):
        if not outcomes:
            outcomes.append(None)
            try:
                outcomes[0] = other_run()
            except Exception as err:  # noqa: BLE001 - the test reads what the other run raised
                outcomes[0] = err
        with real(out):
            yield

    monkeypatch.setattr(module, "output_lock", hooked)
    return outcomes
