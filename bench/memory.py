"""Process memory as the benchmarks read it: lines of /proc/self/status, with getrusage where /proc is absent."""
from __future__ import annotations

import resource
import sys


def status_mib(field: str) -> float | None:
    """A size line of /proc/self/status ("VmRSS": resident now, "VmHWM": peak since exec) in MiB, or None
    where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def maxrss_mib() -> float:
    """Peak resident size from getrusage in MiB (KiB on Linux, bytes on macOS). A forked child keeps its
    parent's value across exec, so prefer status_mib("VmHWM") where it exists."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)
