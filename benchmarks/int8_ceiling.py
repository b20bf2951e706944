#!/usr/bin/env python3
"""INT8 ceiling benchmark: see edgekidney/bench/int8_ceiling.py. Run with --help."""

import sys

from edgekidney.bench.int8_ceiling import main

if __name__ == "__main__":
    sys.exit(main())
