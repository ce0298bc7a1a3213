"""``python -m controller.cli``: the same as the ``leasectl`` console script."""

from controller.cli import main

main()
