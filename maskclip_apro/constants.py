"""Values every stage shares, defined once; this module imports nothing.

IGNORE_INDEX: the label value of pixels that belong to no class (VOC's object outlines,
    mmseg's reduce_zero_label, padded crop pixels). Never scored, never trained on; label
    PNGs store it as 255, docs/data.md lists where each dataset uses it.
IMAGENET_MEAN, IMAGENET_STD: the ImageNet statistics of RGB in [0, 1] (mmseg's
    (123.675, 116.28, 103.53) and (58.395, 57.12, 57.375) on 0-255 pixels). They normalise the
    input of MaskCLIP's test protocol, of ProxyCLIP's vision foundation model and of the
    student, and they are the unit of APro's zetas (docs/refiners.md).
"""

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
