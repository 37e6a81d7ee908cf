"""``python -m tandem.cli``."""

from . import main

main()
