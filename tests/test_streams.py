"""Silencing what libraries write to file descriptors 1 and 2, in a real process with real descriptors."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, sys
from fewshot.streams import descriptor_silenced

print("before")
with descriptor_silenced(1):
    os.write(1, b"library noise on fd 1\\n")  # as C++ code writes
    print("python noise on stdout")
print("after", flush=True)
with descriptor_silenced(2, keep_python_stream=True):
    os.write(2, b"library noise on fd 2\\n")
    print("fewshot: progress", file=sys.stderr)
print("fewshot: done", file=sys.stderr)
"""


def test_descriptor_writes_are_silenced_and_fewshots_own_stderr_stays():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["before", "after"]
    assert done.stderr.splitlines() == ["fewshot: progress", "fewshot: done"]
