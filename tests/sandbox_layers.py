"""Helpers of the sandbox tests: what to do when the host lacks a layer, and an independent process check."""

import os

import pytest


def missing_layer(why: str) -> None:
    """Skip with ``why`` (the missing kernel feature), except in CI as root, where every sandbox layer is
    available and a missing one is a failure, not a reason to skip."""
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"CI runs as root, where every sandbox layer is available, but: {why}")
    pytest.skip(why)


def live_processes_of_uid(uid: int) -> list[int]:
    """Non-zombie processes whose real uid is ``uid``, read from /proc (independent of the sandbox's code)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and fields["State"].split()[0] not in ("Z", "X"):
            found.append(int(entry))
    return found
