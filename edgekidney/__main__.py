"""``python -m edgekidney`` = the ``edgekidney`` command."""

from edgekidney.cli import main

main()
