"""Bundled sample photographs: scikit-image ships them inside its wheel (no download).

astronaut (NASA, public domain), chelsea the cat and coffee (CC0, scikit-image's own),
rocket (NASA, public domain). Their subjects are in the VOC/COCO vocabularies.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_FILES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")


def sample_paths() -> list[Path]:
    """Paths of the bundled sample images."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    paths = [folder / name for name in SAMPLE_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image's sample images are missing: {missing}; reinstall scikit-image")
    return paths
