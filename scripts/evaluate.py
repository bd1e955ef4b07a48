"""Entry point: see maskclip_apro/cli/evaluate.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.evaluate import main

if __name__ == "__main__":
    main()
