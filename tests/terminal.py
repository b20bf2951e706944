"""Run a command in a pipe or in a pseudo-terminal, and replay what a terminal would show."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env_for_subprocess(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TERM="xterm", COLUMNS="160", **extra)
    env.pop("NO_COLOR", None)
    return env


def run_in_pipe(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env_for_subprocess(),
                          cwd=REPO, timeout=timeout)


def run_in_pty(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """stdout and stderr both on one pseudo-terminal, as in an interactive shell; -> (exit code, raw output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env_for_subprocess(), cwd=REPO)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=timeout)
    return code, b"".join(chunks).decode("utf-8", "replace")


def screen(raw: str) -> list[str]:
    """The lines a terminal shows after ``raw``: handles \\r, \\n and erase-line (ESC [2K)."""
    lines: list[str] = []
    cur: list[str] = []
    col = 0
    i = 0
    while i < len(raw):
        if raw.startswith("\x1b[2K", i):
            cur = [" "] * col
            i += 4
            continue
        ch = raw[i]
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.extend([" "] * (col - len(cur)) + [ch])
            col += 1
        i += 1
    if "".join(cur).strip():
        lines.append("".join(cur).rstrip())
    return lines
