"""``python -m controller.emulator [flags]``: the local Daytona API server (see cli.local_daytona)."""

from .cli import main

main()
