"""Entry point: see maskclip_apro/cli/refine.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.entry import refine

if __name__ == "__main__":
    refine()
