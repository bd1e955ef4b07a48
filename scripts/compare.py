"""Entry point: see maskclip_apro/cli/compare.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.compare import main

if __name__ == "__main__":
    main()
