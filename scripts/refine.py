"""Entry point: see maskclip_apro/cli/refine.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.refine import main

if __name__ == "__main__":
    main()
