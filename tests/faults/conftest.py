"""Fault injection (issue 16): each class of fault, with a clear message naming the file, a non-zero exit
where work failed, nothing finished lost, and a rerun identical to an undisturbed run."""

import subprocess
import sys

import pytest


@pytest.fixture
def dead_pid():
    """The pid of a process that has exited (as a killed writer's)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid
