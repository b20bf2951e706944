"""``python -m edgekidney`` = the ``edgekidney`` command."""

from .cli import main

main()
