#!/usr/bin/env python3
"""latency benchmark: see edgekidney/bench/latency.py (also: edgekidney bench latency). Run with --help."""

import sys

from edgekidney.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
