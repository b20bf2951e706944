"""Every command in the README's ```bash blocks runs as written, on the data the README names.

Sizes are made small (epochs, image size, calibration count, benchmark time) by appending options;
the commands themselves are the README's. ``--weights imagenet`` becomes ``--weights none``: tests
have no network (the offline path of ``imagenet`` has its own tests). pip lines are not run (the
test runs inside the installed environment) and neither is the test suite itself.

The default run uses a small copy of the README's data folder (the same real slices, 24 per class);
``-m slow`` runs the same commands on the whole folder, the quantization block included.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SHARED_DATA, copy_slices, real_data_or_skip
from terminal import env_for_subprocess

README = REPO / "README.md"
# appended to each edgekidney subcommand the README runs (small sizes), or "" to run it exactly as written
SMALL = {
    "demo": "--epochs 1 --image-size 32 --patients 4",
    "train": "--epochs 1 --image-size 32",
    "export": "--parity-images 2",
    "evaluate": "",
    "infer": "",
    "calibrate": "--n 16",
    "quantize": "",
    "bench accuracy": "",
    "bench latency": "--seconds 0.2 --batch-sizes 1 --torch none",
}
SKIPPED_PROGRAMS = ("pip", "python")  # installs and the test suite


def readme_blocks() -> list[list[str]]:
    """The commands of each ```bash block (continuation lines joined, comments kept out)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    out = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        out.append([line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")])
    return out


def subcommand(segment: str) -> str:
    words = shlex.split(segment, comments=True)
    return " ".join(words[1:3]) if words[1] == "bench" else words[1]


def runnable(command: str) -> list[str]:
    """The README command, split on '&&', pip/python parts dropped, small sizes appended."""
    parts = []
    for segment in (s.strip() for s in command.split("&&")):
        program = shlex.split(segment, comments=True)[0]
        if program in SKIPPED_PROGRAMS:
            continue
        assert program == "edgekidney" or re.match(r"^[A-Z_]+=", segment), f"README runs {segment!r}: teach test_readme"
        if program == "edgekidney":
            sub = subcommand(segment)
            assert sub in SMALL, f"README runs 'edgekidney {sub}': add it to SMALL in tests/test_readme.py"
            code = re.sub(r"\s+#[^'\"]*$", "", segment)  # a trailing comment would swallow the small sizes
            segment = code.replace("--weights imagenet", "--weights none") + " " + SMALL[sub]
        parts.append(segment)
    return parts


def test_every_readme_command_is_known_and_the_infer_example_names_real_files():
    commands = [c for block in readme_blocks() for c in block]
    subs = {subcommand(s) for c in commands for s in c.split("&&") if s.strip().startswith("edgekidney")}
    assert {"demo", "train", "export", "evaluate", "infer"} <= subs
    for c in commands:
        runnable(c)  # asserts each program and subcommand is one the test can run
    infer = next(c for c in commands if c.startswith("edgekidney infer"))
    for arg in shlex.split(infer.replace("$D", str(SHARED_DATA)))[3:]:
        if not arg.startswith("-") and arg != "results.json":
            assert Path(arg).exists() or not SHARED_DATA.exists(), f"README's infer example names {arg}, which is missing"


def run_readme(tmp_path: Path, data: Path, blocks: list[list[str]]) -> list[str]:
    """Run the blocks' commands in order in ``tmp_path`` (D = ``data``); returns what each printed."""
    prelude = 'set -euo pipefail\nedgekidney() { python -m edgekidney "$@"; }\n'
    outputs = []
    for block in blocks:
        for command in block:
            for segment in runnable(command):
                if segment.startswith("D="):  # the README's data folder (relative to the repository root)
                    assert segment.split()[0] == "D=../shared/data/ct-kidney-axial", segment
                    prelude += f"D={shlex.quote(str(data))}\n"
                    continue
                r = subprocess.run(["bash", "-c", prelude + segment], cwd=tmp_path, capture_output=True, text=True,
                                   env=env_for_subprocess(), timeout=1800)
                gate_failed = segment.startswith("edgekidney bench accuracy") and r.returncode == 1 \
                    and "error:" not in r.stderr  # documented: exit 1 when a quality gate fails
                assert r.returncode == 0 or gate_failed, f"{segment}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
                assert "Traceback" not in r.stderr, r.stderr
                outputs.append(r.stdout + r.stderr)
    return outputs


@pytest.fixture()
def small_readme_data(tmp_path_factory):
    real = real_data_or_skip()
    numbers = list(range(1, 17)) + list(range(381, 389))  # train blocks and one validation block per class
    return copy_slices(real, tmp_path_factory.mktemp("readme_data"), classes=("Normal", "Stone", "Cyst", "Tumor"),
                       numbers=numbers + [17])  # 17: the slice the infer example names


def test_readme_getting_started_and_real_ct_commands_run(tmp_path, small_readme_data):
    blocks = readme_blocks()
    first, real_ct = blocks[0], next(b for b in blocks if any(c.startswith("D=") for c in b))
    out = run_readme(tmp_path, small_readme_data, [first, real_ct])
    assert (tmp_path / "runs" / "demo" / "demo.json").exists()
    assert (tmp_path / "runs" / "ct" / "model.onnx").exists() and (tmp_path / "results.json").exists()
    assert "label = Stone when p(Stone) >= " in out[-1] and "Stone- (17).jpg" in out[-1]


@pytest.mark.slow
def test_readme_commands_run_on_the_whole_data_folder(tmp_path):
    run_readme(tmp_path, real_data_or_skip(), readme_blocks())
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.trt.onnx", "model.int8.cpu.onnx"):
        assert (tmp_path / "runs" / "ct" / name).exists(), name
