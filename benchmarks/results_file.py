"""Shared ending of the benchmark scripts: the command, machine and date lines, and writing the file."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


def footer(command: str, machine_extra: str = "") -> list[str]:
    """The lines that close a results table: the command that reproduces it, the machine (with
    ``machine_extra`` appended, e.g. peak memory) and the UTC date."""
    return [
        "",
        f"- Command: `{command}`",
        f"- Machine: {platform.system()} {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}{machine_extra}",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
    ]


def write_results(lines: list[str], out: str | Path) -> Path:
    """Write the markdown lines to ``out`` (creating its folder) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out
