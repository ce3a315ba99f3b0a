"""Write one benchmark's section of bench/RESULTS.md, leaving the other sections alone."""
from __future__ import annotations

import os
import platform
import re
from datetime import date

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "RESULTS.md")
HEADER = "# Benchmark results\n\nWritten by `make bench` (scripts in `bench/`); each section " \
         "says the machine and date it was measured on.\n"


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU x{os.cpu_count()}, " \
           f"torch {torch.__version__}"


def update_section(title: str, body: str, stamp: str | None = None) -> None:
    """Replace the `## title` section (or append it) with body, stamped with machine and date
    (this one's and today's unless `stamp` says where and when it was measured)."""
    text = HEADER
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            text = f.read()
    stamp = stamp or f"{machine()}, {date.today().isoformat()}"
    section = f"## {title}\n\n_{stamp}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else \
        text.rstrip() + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text.rstrip() + "\n")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
