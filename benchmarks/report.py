"""What the benchmark scripts print and save: the machine line, a Markdown table of the results, the rows as
JSON. Import it after ``preload_tcmalloc()`` (it imports JAX)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import jax

from gdsd_jax.allocator import active_allocator


def machine_line() -> str:
    """``# <cpu>, <n> CPUs, jax <version>, allocator <name>, load average at start (1, 5, 15 min)``."""
    return (f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
            f"allocator {active_allocator()}, load average at start {os.getloadavg()}")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table after a blank line: the header, the separator, one line per row of cells."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(str(c) for c in cells) + " |")


def save_rows(path: str | None, rows: list[dict]) -> None:
    """Write the result rows to ``path`` as JSON (nothing when ``path`` is None)."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))
