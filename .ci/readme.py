#!/usr/bin/env python3
"""The README's commands, read from README.md itself so that CI and the tests cannot drift from it.

A command block the README wants run is marked by an HTML comment on the line before its fence,
invisible on GitHub::

    <!-- ci: install -->
    ```bash
    python -m venv .venv && . .venv/bin/activate
    pip install '.[dicom,nifti,sr]'
    ```

Roles: ``install`` (the user's install), ``first`` (the first command, on the released model),
``train`` (torch, the train extra and the demo), ``test`` (the test command), ``data`` (real data).

    python3 .ci/readme.py show ROLE...                 # the commands as written
    python3 .ci/readme.py script ROLE... [--torch-line CMD]
                                                       # a bash script running them at small sizes
    python3 .ci/readme.py helps EXE                    # EXE --help and every subcommand's --help

Standard library only: it runs on the system Python and inside the venvs CI makes.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ROLES = ("install", "first", "train", "test", "data")
MARKER = re.compile(r"^<!-- ci: (\w+) -->\n```bash\n(.*?)^```", flags=re.M | re.S)
# The README's CPU-only torch line: its index is unreachable from CI, which installs torch its own way.
TORCH_LINE = re.compile(r"^pip install torch torchvision --index-url https://download\.pytorch\.org/whl/cpu\b")

# Appended to each edgekidney subcommand the README runs, to keep CI and the tests short ("" = as written).
SMALL = {
    "demo": "--epochs 1 --image-size 32 --patients 4",
    "study": "",
    "train": "--epochs 1 --image-size 32",
    "export": "--parity-images 2",
    "evaluate": "",
    "infer": "",
    "calibrate": "--n 16",
    "quantize": "",
    "bench accuracy": "",
    "bench latency": "--seconds 0.2 --batch-sizes 1 --torch none",
}


def lines_of(block: str) -> list[str]:
    """A block's command lines: continuation lines joined, comment-only and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def marked_blocks(text: str | None = None) -> dict[str, list[str]]:
    """Role -> the command lines of the block marked ``<!-- ci: ROLE -->`` (each role once)."""
    text = README.read_text() if text is None else text
    out: dict[str, list[str]] = {}
    for role, body in MARKER.findall(text):
        if role not in ROLES:
            raise SystemExit(f"README.md: unknown block role {role!r} (known: {', '.join(ROLES)})")
        if role in out:
            raise SystemExit(f"README.md: two blocks marked {role!r}")
        out[role] = lines_of(body)
    return out


def bash_blocks(text: str | None = None) -> list[list[str]]:
    """Every ```bash block of the README, marked or not, in order."""
    text = README.read_text() if text is None else text
    return [lines_of(b) for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)]


def subcommand(segment: str) -> str:
    words = shlex.split(segment, comments=True)
    return " ".join(words[1:3]) if len(words) > 2 and words[1] == "bench" else words[1]


def strip_comment(segment: str) -> str:
    """A trailing ``# comment`` would swallow options appended after it."""
    return re.sub(r"\s+#[^'\"]*$", "", segment)


def small(line: str) -> str:
    """One README line with small sizes appended to each edgekidney command in it."""
    if not any(shlex.split(s, comments=True)[:1] == ["edgekidney"] for s in line.split("&&")):
        return line  # as written, byte for byte
    segments = []
    for segment in (s.strip() for s in line.split("&&")):
        if shlex.split(segment, comments=True)[0] == "edgekidney":
            sub = subcommand(segment)
            if sub not in SMALL:
                raise SystemExit(f"README runs 'edgekidney {sub}': add it to SMALL in .ci/readme.py")
            segment = f"{strip_comment(segment)} {SMALL[sub]}".rstrip()
        segments.append(segment)
    return " && ".join(segments)


def script(roles: list[str], torch_line: str | None = None) -> str:
    """A bash script that runs the roles' lines in order, each echoed first, at small sizes."""
    blocks = marked_blocks()
    out = ["set -euo pipefail"]
    for role in roles:
        if role not in blocks:
            raise SystemExit(f"README.md has no block marked <!-- ci: {role} -->")
        for line in blocks[role]:
            if TORCH_LINE.match(line):
                if torch_line is None:
                    raise SystemExit(f"README line {line!r} needs --torch-line here")
                out.append(f"echo {shlex.quote('+ (README: ' + line + ')')}")
                line = torch_line
            else:
                line = small(line)
            out.append(f"echo {shlex.quote('+ ' + line)}")
            out.append(line)
    return "\n".join(out) + "\n"


def commands_of(help_text: str) -> list[str]:
    """The subcommand names listed under 'Commands:' in a --help text."""
    names, inside = [], False
    for line in help_text.splitlines():
        if line.strip() == "Commands:":
            inside = True
        elif inside and line.startswith("  ") and line.strip():
            names.append(line.split()[0])
        elif inside and line.strip() and not line.startswith(" "):
            inside = False
    return names


def helps(exe: str) -> int:
    """``EXE --help`` and every (sub)command's ``--help`` exit 0 with a usage line and no traceback."""
    todo, seen, failed = [[]], 0, 0
    while todo:
        words = todo.pop(0)
        r = subprocess.run([exe, *words, "--help"], capture_output=True, text=True, timeout=120)
        ok = r.returncode == 0 and r.stdout.startswith("Usage:") and "Traceback" not in r.stderr
        seen += 1
        if not ok:
            failed += 1
            print(f"FAILED: {exe} {' '.join(words)} --help (exit {r.returncode})\n{r.stdout[-1500:]}{r.stderr[-3000:]}")
        todo += [words + [name] for name in commands_of(r.stdout)]
    print(f"{exe} --help and every subcommand's --help: {seen} ran, {failed} failed")
    return 1 if failed or seen < 2 else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "helps":
        return helps(argv[1])
    if len(argv) >= 2 and argv[0] in ("show", "script"):
        torch_line = None
        if "--torch-line" in argv:
            i = argv.index("--torch-line")
            torch_line, argv = argv[i + 1], argv[:i] + argv[i + 2:]
        if argv[0] == "show":
            blocks = marked_blocks()
            print("\n".join(line for role in argv[1:] for line in blocks.get(role, [])))
        else:
            sys.stdout.write(script(argv[1:], torch_line))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
