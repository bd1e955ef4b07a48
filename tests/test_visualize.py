"""Panels: label maps in the palette's colours and a legend naming exactly the classes shown."""

from __future__ import annotations

import numpy as np

from maskclip_apro.palette import voc_palette
from maskclip_apro.visualize import TITLE_HEIGHT, colorize, legend_entries, make_panel

NAMES = [f"class{i}, synonym" for i in range(21)]


def _maps():
    truth = np.full((20, 30), 15, dtype=np.int64)
    truth[:, :3] = 255  # ignore
    pred = np.full((20, 30), 15, dtype=np.int64)
    pred[5:10, 5:10] = 3
    pred[12:, 20:] = 12
    return truth, pred


def test_the_legend_lists_exactly_the_classes_present_with_the_palettes_colours():
    truth, pred = _maps()
    palette = voc_palette(256)
    entries = legend_entries([truth, pred], NAMES, palette)
    assert entries == [("class3", tuple(palette[3])), ("class12", tuple(palette[12])),
                       ("class15", tuple(palette[15])), ("ignore", (255, 255, 255))]
    assert legend_entries([pred], NAMES) == entries[:3]  # no ignore pixels: no ignore entry; VOC palette by default


def _count(region: np.ndarray, colour) -> int:
    return int((region == np.asarray(colour, dtype=np.uint8)).all(axis=2).sum())


def test_the_panel_draws_a_swatch_per_class_present_and_none_for_the_others():
    truth, pred = _maps()
    image = np.full((20, 30, 3), 90, np.uint8)
    height = 40
    plain = make_panel([("image", image), ("truth", truth), ("pred", pred)], height=height)
    panel = make_panel([("image", image), ("truth", truth), ("pred", pred)], height=height, class_names=NAMES)
    np.testing.assert_array_equal(panel[: height + TITLE_HEIGHT], plain)  # the columns are unchanged
    legend = panel[height + TITLE_HEIGHT:]
    assert legend.shape[0] > 0 and legend.shape[1] == panel.shape[1]
    palette = voc_palette(256)
    swatch_inside = 10 * 10  # a 12-px swatch inside its 1-px outline
    for c in (3, 12, 15):
        assert _count(legend, palette[c]) >= swatch_inside, c
    for c in set(range(1, 21)) - {3, 12, 15}:
        if len(set(palette[c].tolist())) > 1:  # grey palette entries could be text antialiasing
            assert _count(legend, palette[c]) < swatch_inside, c


def test_label_map_columns_are_coloured_as_colorize_does():
    truth, _ = _maps()
    panel = make_panel([("truth", truth)], height=20)
    np.testing.assert_array_equal(panel[TITLE_HEIGHT:], colorize(truth))
    assert (colorize(truth)[:, :3] == 255).all()  # ignore is white
