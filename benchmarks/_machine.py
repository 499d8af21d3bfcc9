"""The machine a benchmark ran on, for its results file."""
from __future__ import annotations

import os
import platform


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """``"<cpu>, <n> cores, <system> <release>"``."""
    return f"{cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def write_results(out: str, res: dict, lines: list) -> None:
    """Write ``out.json`` (``res``) and ``out.md`` (``lines``) and print the table."""
    import json

    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(res, fh, indent=1)
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
