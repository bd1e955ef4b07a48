"""Entry point: see maskclip_apro/cli/evaluate.py (Hydra overrides as arguments)."""

from maskclip_apro.cli.entry import evaluate

if __name__ == "__main__":
    evaluate()
