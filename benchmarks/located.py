#!/usr/bin/env python3
"""located-share benchmark: see edgekidney/bench/located.py. Run with --help."""

import sys

from edgekidney.bench.located import main

if __name__ == "__main__":
    sys.exit(main())
