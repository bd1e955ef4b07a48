"""Entry point: see maskclip_apro/cli/train.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.entry import train

if __name__ == "__main__":
    train()
