#!/usr/bin/env python3
"""accuracy benchmark: see edgekidney/bench/accuracy.py (also: edgekidney bench accuracy). Run with --help."""

import sys

from edgekidney.bench.accuracy import main

if __name__ == "__main__":
    sys.exit(main())
