"""What every benchmark says about the machine it ran on, and how it records a result.

Results are only comparable as ratios measured in one run; the machine line (CPU,
cores, memory, load average) says how busy the shared machine was meanwhile.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def describe(*extra: str) -> str:
    """One line: OS, cores and CPU model, RAM, Python, load average, plus ``extra`` facts."""
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 ** 3)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    parts = [f"{platform.system()} {platform.release()}", f"{os.cpu_count()} CPUs ({cpu})", f"{mem} GiB RAM",
             f"Python {platform.python_version()}", *extra,
             f"load average {load} (a shared machine: wall times are noisy)"]
    return ", ".join(parts)


def record(report: str, *, section: str = "") -> None:
    """Add ``report`` to bench/RESULTS.md: newest first under ``section`` if given, else at the end."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if not section:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + report.strip("\n") + "\n")
        return
    if section not in text:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    head, _, tail = text.partition(section)
    RESULTS.write_text(head + section + "\n\n" + report.strip("\n") + "\n" + tail)
