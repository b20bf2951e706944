"""Out of scope and calculus pairs on real CT of other hospitals: see edgekidney/bench/scope.py."""

import sys

from edgekidney.bench.scope import main

if __name__ == "__main__":
    sys.exit(main())
