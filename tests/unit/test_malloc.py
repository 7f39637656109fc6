"""Freed message buffers go back to the system (glibc): the reliability run's server kept 446 MB
resident with nothing in flight before this."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from maildetour.malloc import return_large_buffers
if sys.argv[1] == "fixed":
    assert return_large_buffers()
MB = 1 << 20
first = bytearray(25 * MB); del first   # glibc raises its mmap threshold to 25 MB here
kept = []
for _ in range(8):
    block = bytearray(25 * MB)          # then a message's bytes come from the heap...
    kept.append(bytearray(64))          # ...with something small after them
    del block
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) // 1024)
"""


def resident_mb(mode: str) -> int:
    return int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                              check=True).stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_a_freed_25_mb_buffer_does_not_stay_resident() -> None:
    default, fixed = resident_mb("default"), resident_mb("fixed")
    assert default - fixed >= 20, (default, fixed)  # one 25 MB block kept by default, none when fixed
