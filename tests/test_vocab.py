"""Built-in vocabularies and load_vocab validation."""

import pytest

from maskclip_apro.data import BUILTIN_VOCABS, load_vocab, primary_name, split_synonyms


@pytest.mark.parametrize(
    "name, count, first",
    [("voc20", 20, "airplane"), ("voc21", 21, "background"), ("context59", 59, "airplane"),
     ("context60", 60, "background"), ("cocostuff171", 171, "person")],
)
def test_builtin_counts(name, count, first):
    names = load_vocab(name)
    assert len(names) == count
    assert names[0] == first
    assert len({n.lower() for n in names}) == count


def test_builtin_relations():
    assert load_vocab("voc21")[1:] == load_vocab("voc20")
    assert load_vocab("context60")[1:] == load_vocab("context59")
    assert set(BUILTIN_VOCABS) == {
        "voc20", "voc21", "context59", "context60", "cocostuff171", "cocoobject81", "cityscapes19", "ade150"
    }
    coco = load_vocab("cocostuff171")
    # spot checks of the mmseg train-id order
    assert coco[79] == "toothbrush" and coco[80] == "banner" and coco[170] == "wood"
    assert load_vocab("voc20")[14] == "person"  # VOC class 15 - 1


def test_builtin_names_are_spelled_as_maskclip_prompts_them():
    """Names as in MaskCLIP's tools/maskclip_utils/prompt_engineering.py (the text its embeddings saw)."""
    voc, context, coco = load_vocab("voc20"), load_vocab("context59"), load_vocab("cocostuff171")
    assert voc[0] == "airplane" and voc[10] == "dining table" and voc[13] == "motorbike"
    assert voc[15] == "potted plant" and voc[19] == "tv monitor"
    assert context[0] == "airplane" and context[43] == "shelves" and context[54] == "tv monitor"
    # COCO-Stuff: readable stuff names instead of mmseg's "-other" / "-stuff" spellings
    assert coco[84] == "building" and coco[91] == "tile ceiling" and coco[98] == "desk"
    assert coco[102] == "marble floor" and coco[103] == "floor" and coco[145] == "sky"
    assert coco[159] == "brick wall" and coco[161] == "wall" and coco[168] == "blind window"
    assert coco[169] == "window" and coco[152] == "structural"
    mmseg_style = [n for n in coco if "-" in n]
    assert mmseg_style == []


def test_file_and_list(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\n\n  person ,  man \ncat\n")
    assert load_vocab(path) == ["background", "person , man", "cat"]
    assert split_synonyms("person , man") == ["person", "man"]
    assert primary_name("person , man") == "person"
    assert load_vocab(["a", " b  c "]) == ["a", "b c"]
    assert load_vocab(("x",)) == ["x"]


def test_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        load_vocab(empty)
    dup = tmp_path / "dup.txt"
    dup.write_text("cat\ndog\nCat\n")
    with pytest.raises(ValueError, match=r"dup.txt.*duplicate.*\['cat'\]"):
        load_vocab(dup)
    with pytest.raises(ValueError, match="duplicate.*'man'"):
        load_vocab(["person, man", "man"])
    with pytest.raises(ValueError, match="empty class names at positions \\[1\\]"):
        load_vocab(["a", ","])
    with pytest.raises(ValueError, match="empty"):
        load_vocab([])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocab(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unknown vocabulary 'voc22'"):
        load_vocab("voc22")
