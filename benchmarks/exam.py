#!/usr/bin/env python3
"""whole-exam benchmark: see edgekidney/bench/exam.py. Run with --help."""

import sys

from edgekidney.bench.exam import main

if __name__ == "__main__":
    sys.exit(main())
