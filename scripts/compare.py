"""Entry point: see maskclip_apro/cli/compare.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.entry import compare

if __name__ == "__main__":
    compare()
