"""Benchmarks that prove accuracy and latency hold after quantization (also run from benchmarks/)."""

import argparse as _argparse
import sys as _sys


class ArgumentParser(_argparse.ArgumentParser):
    """argparse, but a usage error exits 1 with one line, like every other edgekidney command."""

    def error(self, message: str):
        print(f"error: {message}", file=_sys.stderr)
        raise SystemExit(1)
