"""Copy a ``pixreg compare`` result (``OUT/compare.{md,json}``, per-class plots) into
``benchmarks/results/NAME.{md,json}`` with the command, machine and date.

    python benchmarks/publish_compare.py OUT NAME "compare --config ... (the pixreg arguments)" [NOTE_FILE]

``NOTE_FILE`` (optional): Markdown put between the header and the tables (protocol notes).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import cpu_name  # noqa: E402


def publish(out: str, name: str, cmd: str, note: str = "") -> str:
    import torch

    cpu = cpu_name()
    date = datetime.date.today().isoformat()
    head = (f"Command: `pixreg {cmd}`\n\nMachine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"Python {platform.python_version()}\n\nDate: {date}\n\n")
    results = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(out, "compare.md")) as f:
        body = f.read()
    path = os.path.join(results, f"{name}.md")
    with open(path, "w") as f:
        f.write(head + (note.strip() + "\n\n" if note.strip() else "") + body)
    with open(os.path.join(out, "compare.json")) as f:
        summary = json.load(f)
    summary["command"], summary["machine"], summary["date"] = "pixreg " + cmd, cpu, date
    with open(os.path.join(results, f"{name}.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    for fn in os.listdir(out):
        if fn.startswith("per_class_iou") and fn.endswith(".png"):
            shutil.copy(os.path.join(out, fn), os.path.join(results, f"{name}_{fn}"))
    return path


if __name__ == "__main__":
    note_text = open(sys.argv[4]).read() if len(sys.argv) > 4 else ""
    print("wrote", publish(sys.argv[1], sys.argv[2], sys.argv[3], note_text))
