"""The four commands' entry points (console scripts and scripts/*.py).

A command imports torch, open_clip and Hydra before it runs, which takes seconds; an entry point
imports its command only inside the same Ctrl-C handling the command has once it runs, so an
interrupt while starting also ends with one line and status 130, not a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

COMMANDS = ("refine", "evaluate", "compare", "train")


def _entry(name: str) -> Callable[[], Any]:
    def main() -> Any:
        try:
            command = importlib.import_module(f"maskclip_apro.cli.{name}")
        except KeyboardInterrupt:
            print(f"\n{name} interrupted (Ctrl-C) while starting; nothing was written", file=sys.stderr)
            raise SystemExit(130) from None
        return command.main()

    main.__name__ = name
    main.__doc__ = f"The {name} command (Hydra overrides as arguments)."
    return main


refine, evaluate, compare, train = (_entry(name) for name in COMMANDS)
