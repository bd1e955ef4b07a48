"""Convert COCO-Stuff 164k raw label maps to COCO-Object (background + 80 things), as the SCLIP harness does.

    python scripts/convert_coco_object.py data/coco_stuff164k                 # labels beside the originals
    python scripts/convert_coco_object.py data/coco_stuff164k -o data/coco_object --splits val2017 train2017

Reads <root>/annotations/<split>/<stem>.png (stuffthingmaps, mmseg layout), writes
<out>/annotations/<split>/<stem>_instanceTrainIds.png (maskclip_apro.data.cocoobject).
"""

from __future__ import annotations

import argparse
import sys

from maskclip_apro.data.cocoobject import convert_coco_object


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("coco_root", help="COCO-Stuff 164k root (images/, annotations/)")
    parser.add_argument("-o", "--out", default=None, help="output root (default: coco_root)")
    parser.add_argument("--splits", nargs="+", default=["val2017"], help="annotation folders to convert")
    args = parser.parse_args(argv)
    try:
        count = convert_coco_object(args.coco_root, args.out, tuple(args.splits))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} COCO-Object label maps under {args.out or args.coco_root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
