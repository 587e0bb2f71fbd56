"""Sentence kinds and the pairs per kind: relation -> union box, scene -> whole image, label-aware scores."""

import numpy as np
import pytest

from pipeline.kinds import KindClassifier, is_word, rule_lemma
from pipeline.matching import select_two, union_box
from pipeline.regions import RegionPairer
from tests.test_regions import ColourScorer, encode, regions_cfg, shard_inputs, two_colour_image

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def kinds():
    return KindClassifier("blank:en", ["circle", "square", "hexagon", "person", "bicycle", "dog"])


@pytest.mark.parametrize("text, kind, pair", [
    ("A man in a red jacket stands to the left of a parked bicycle.", "relation", ("A man", "a parked bicycle")),
    ("The purple hexagon is to the right of the yellow hexagon.", "relation",
     ("The purple hexagon", "the yellow hexagon")),
    ("The red circle is above the blue squares.", "relation", ("The red circle", "the blue squares")),
    ("Two dogs play next to a tree.", "relation", ("Two dogs", "a tree")),
    ("The background is beige.", "scene", None),
    ("The sky is clear and blue.", "scene", None),
    ("In the top left there is a small red striped circle, marked with the digit 3.", "object", None),
    ("A large blue dotted square, marked with the digit 7, sits in the bottom right.", "object", None),
    ("A woman holding an umbrella waits at the bus stop.", "object", None),
    ("It looks very nice.", "other", None),
])
def test_kinds_of_hand_written_sentences(kinds, text, kind, pair):
    k = kinds.classify([text])[0]
    assert k.kind == kind
    if pair:
        assert (k.phrases[k.pair[0]].text, k.phrases[k.pair[1]].text) == pair


def test_heads_lemmas_and_label_agreement(kinds):
    obj = kinds.classify(["In the top left there is a small red striped circle, marked with the digit 3."])[0]
    assert obj.heads[0] == "circle"  # the place phrase ("the top left") is not an object
    assert kinds.agreement(obj, "circle") == 1.0 and kinds.agreement(obj, "square") == 0.0
    rel = kinds.classify(["A man in a red jacket stands to the left of a parked bicycle."])[0]
    assert kinds.agreement(rel, "person") == 1.0  # man -> person (built-in synonym)
    assert kinds.agreement(rel, "bicycle") == 0.5  # named, but not the main object
    extra = KindClassifier("blank:en", ["circle"], {"circle": ["disc"]}).classify(["A green disc."])[0]
    assert extra.heads == ["disc"] and KindClassifier("blank:en", ["circle"], {"circle": ["disc"]}).agreement(
        extra, "circle") == 1.0
    assert [rule_lemma(w) for w in ("squares", "boxes", "ponies", "men", "glass", "bus")] == [
        "square", "box", "pony", "man", "glass", "bus"]
    assert is_word("traffic light") and not is_word("0") and not is_word("cls_3")


def test_select_two_and_union_box():
    two = select_two(np.array([0.9, 0.8, 0.1]), np.array([0.9, 0.2, 0.7]), threshold=0.5, margin=0.01)
    assert two["regions"] == (1, 0) and two["score"] == pytest.approx(0.85)  # i != j: not (0, 0)
    assert two["margin"] == pytest.approx(0.85 - 0.8) and two["kept"]
    assert union_box([0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.6, 0.3]) == [0.1, 0.1, 0.6, 0.4]
    assert select_two(np.array([0.9]), np.array([0.9]), 0, 0)["regions"] is None


class FakeDetector:
    """Fixed boxes per image (the stage's detector interface: names, detect)."""

    def __init__(self, dets, names=("circle", "square")):
        self.dets, self.names = dets, dict(enumerate(names))

    def detect(self, images):
        return [[dict(d) for d in self.dets] for _ in images]


def det(box, cls, score=0.9):
    return {"box": box, "source": f"det:{cls}", "score": score}


def pair_one(tmp_path, sentences, dets, **cfg):
    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image(), quality=95)}, {"000": sentences})
    out = RegionPairer(regions_cfg(**cfg), ColourScorer(), FakeDetector(dets)).pair_shard(meta, tar, st)
    return out.to_pylist()[0]


def test_relation_sentence_pairs_with_the_union_of_its_two_objects(tmp_path):
    dets = [det([0.1, 0.1, 0.4, 0.4], "circle"), det([0.6, 0.5, 0.9, 0.8], "square", 0.8)]
    row = pair_one(tmp_path, ["The red circle is to the left of the blue square."], dets, threshold=0.3)
    m = row["matches"][0]
    assert m["kind"] == "relation" and m["kept"] and m["top_regions"] == [0, 1]
    union = row["regions"][m["region"]]
    assert union["source"] == "union:0+1" and union["score"] is None
    assert union["box"] == pytest.approx([0.1, 0.1, 0.9, 0.8])
    # configurable: the best single region instead
    row = pair_one(tmp_path, ["The red circle is to the left of the blue square."], dets,
                   threshold=0.3, pair_relation="best")
    assert row["matches"][0]["kind"] == "relation" and row["matches"][0]["region"] in (0, 1)
    assert not any(g["source"].startswith("union") for g in row["regions"])


def test_scene_sentence_pairs_with_the_whole_image(tmp_path):
    row = pair_one(tmp_path, ["The background is beige.", "A blue square."], [])  # division: halves only
    scene, obj = row["matches"]
    assert scene["kind"] == "scene" and scene["kept"] and scene["score"] is None
    assert row["regions"][scene["region"]] == {"box": [0.0, 0.0, 1.0, 1.0], "source": "grid:whole:0", "score": None}
    assert obj["kind"] == "object" and obj["region"] == 1 and obj["kept"]  # the right half
    from pipeline.regions import goal_records
    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image(), quality=95)},
                                 {"000": ["The background is beige."]})
    out = RegionPairer(regions_cfg(), ColourScorer()).pair_shard(meta, tar, st)
    assert goal_records(out, st)[0]["segment"] == [
        {"caption": "The background is beige.", "similarity_score": None, "bbox_coordinates": [0, 0, 64, 64]}]
    row = pair_one(tmp_path, ["The background is beige."], [], division=["whole", "halves"])
    m = row["matches"][0]
    assert m["region"] == 0 and m["kept"] and m["score"] is not None and len(row["regions"]) == 5  # reused
    m = pair_one(tmp_path, ["The background is beige."], [], pair_scene="none")["matches"][0]
    assert m["kind"] == "scene" and not m["kept"]


def test_label_aware_term_moves_the_pair_to_the_box_of_the_named_class(tmp_path):
    # two red boxes (both in the red left half): the colour scorer cannot tell them apart
    dets = [det([0.0, 0.0, 0.45, 0.45], "circle"), det([0.0, 0.55, 0.45, 1.0], "square", 0.8)]
    sent = ["A red square sits in the bottom left."]
    off = pair_one(tmp_path, sent, dets, labels=False, margin=0.0)["matches"][0]
    on = pair_one(tmp_path, sent, dets, margin=0.0, label_scale="flat")  # default: on, the class names are words
    assert off["region"] == 0  # a tie goes to the first region: the circle
    m = on["matches"][0]
    assert on["regions"][m["region"]]["source"] == "det:square" and m["kept"]
    assert m["score"] == pytest.approx(off["score"] + 1.0, abs=1e-4) and m["margin"] == pytest.approx(1.0, abs=1e-4)
    # the default scale: label_weight times the box's detector confidence (0.8)
    m = pair_one(tmp_path, sent, dets, margin=0.0, label_weight=0.5)["matches"][0]
    assert m["region"] == 1 and m["score"] == pytest.approx(off["score"] + 0.5 * 0.8, abs=1e-4)
    # class names that are not words: off by default
    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image(), quality=95)}, {"000": sent})
    numbered = FakeDetector([det(d["box"], str(k)) for k, d in enumerate(dets)], names=("0", "1"))
    row = RegionPairer(regions_cfg(margin=0.0), ColourScorer(), numbered).pair_shard(meta, tar, st).to_pylist()[0]
    assert row["matches"][0]["region"] == 0 and row["matches"][0]["score"] == pytest.approx(off["score"])


def test_kind_reaches_the_export_doc(tmp_path):
    from pipeline.export import regions_by_key

    meta, tar, st = shard_inputs(tmp_path, {"000": encode(two_colour_image())},
                                 {"000": ["A red square.", "The background is white."]})
    out = RegionPairer(regions_cfg(), ColourScorer()).pair_shard(meta, tar, st)
    assert [(p["sentence"], p["kind"]) for p in regions_by_key(out)["000"]["pairs"]] == [
        ("A red square.", "object"), ("The background is white.", "scene")]


def test_object_sentence_pairs_with_a_detector_box_over_a_division_box(tmp_path):
    # the left half is all red: the colour scorer prefers it to the box that straddles the middle (red + blue)
    dets = [det([0.3, 0.0, 0.7, 0.5], "square")]
    sent = ["A red square."]
    every = pair_one(tmp_path, sent, dets, labels=False, threshold=0.0, margin=0.0, object_regions="all")
    assert every["regions"][every["matches"][0]["region"]]["source"] == "grid:halves:0"
    row = pair_one(tmp_path, sent, dets, labels=False, threshold=0.0, margin=0.0)  # default: detector
    m = row["matches"][0]
    assert row["regions"][m["region"]]["source"] == "det:square" and m["kept"]
    assert m["top_regions"] == [0]  # only detector boxes competed
    # no detector box in the image: the division boxes compete
    row = pair_one(tmp_path, sent, [], labels=False, threshold=0.0, margin=0.0)
    assert row["regions"][row["matches"][0]["region"]]["source"] == "grid:halves:0"


def test_relation_union_is_built_from_two_detector_boxes(tmp_path):
    dets = [det([0.3, 0.1, 0.6, 0.3], "circle"), det([0.4, 0.5, 0.8, 0.7], "square")]  # both straddle the middle
    sent = ["The red circle is to the left of the blue square."]
    # labels off: over every region, each colour's pure half wins (their union is the whole image)
    every = pair_one(tmp_path, sent, dets, labels=False, threshold=0.0, margin=0.0, relation_regions="all")
    m = every["matches"][0]
    assert [every["regions"][k]["source"] for k in m["top_regions"]] == ["grid:halves:0", "grid:halves:1"]
    row = pair_one(tmp_path, sent, dets, labels=False, threshold=0.0, margin=0.0)  # default: detector
    m = row["matches"][0]
    assert m["kind"] == "relation" and m["top_regions"] == [0, 1] and m["kept"]
    assert row["regions"][m["region"]]["box"] == pytest.approx([0.3, 0.1, 0.8, 0.7])
    # one detector box only: every region competes
    row = pair_one(tmp_path, sent, dets[:1], labels=False, threshold=0.0, margin=0.0)
    assert [row["regions"][k]["source"] for k in row["matches"][0]["top_regions"]] == ["grid:halves:0",
                                                                                       "grid:halves:1"]


def test_class_alternatives_let_the_label_pick_the_detectors_second_reading(tmp_path):
    # the detector read one object as a circle (0.9) and, less sure, as a square (0.3)
    dets = [det([0.1, 0.1, 0.4, 0.4], "circle", 0.9), det([0.1, 0.1, 0.4, 0.41], "square", 0.3)]
    sent = ["A red square."]
    row = pair_one(tmp_path, sent, dets, threshold=0.0, margin=0.0)  # default: alternatives kept
    assert [g["source"] for g in row["regions"][:2]] == ["det:circle", "det:square"]
    assert row["regions"][row["matches"][0]["region"]]["source"] == "det:square"
    row = pair_one(tmp_path, sent, dets, threshold=0.0, margin=0.0, class_alternatives=False)
    assert [g["source"] for g in row["regions"]][:2] == ["det:circle", "grid:halves:0"]  # the square was dropped
    assert row["regions"][row["matches"][0]["region"]]["source"] == "det:circle"


def test_object_sentence_scored_by_its_noun_phrase_what_a_crop_shows(tmp_path):
    dets = [det([0.1, 0.1, 0.4, 0.4], "square")]  # all red
    sent = ["A red square, with blue edges."]  # the sentence names blue too; its main phrase does not
    got = {t: pair_one(tmp_path, sent, dets, labels=False, threshold=0.0, margin=0.0, object_text=t)["matches"][0]
           for t in ("sentence", "phrase", "mean")}
    assert all(m["kind"] == "object" and m["region"] == 0 for m in got.values())
    assert got["phrase"]["score"] == pytest.approx(1.0, abs=1e-4)  # "A red square" against a red crop
    assert got["sentence"]["score"] < 0.9
    assert got["mean"]["score"] == pytest.approx((got["phrase"]["score"] + got["sentence"]["score"]) / 2, abs=1e-4)


def test_relation_objects_are_two_distinct_regions_not_two_readings_of_one(tmp_path):
    # the circle was also read as a square; the real square (below it, also red) is less sure
    dets = [det([0.1, 0.1, 0.4, 0.4], "circle", 0.9), det([0.1, 0.1, 0.4, 0.41], "square", 0.85),
            det([0.1, 0.5, 0.4, 0.8], "square", 0.3)]
    sent = ["The red circle is above the red square."]
    row = pair_one(tmp_path, sent, dets, threshold=0.0, margin=0.0, relation_max_iou=1.0)  # no constraint
    assert row["matches"][0]["top_regions"] == [0, 1]  # both "objects" are the red one
    row = pair_one(tmp_path, sent, dets, threshold=0.0, margin=0.0)  # default 0.5
    m = row["matches"][0]
    assert m["top_regions"] == [0, 2] and row["regions"][m["region"]]["box"] == pytest.approx([0.1, 0.1, 0.4, 0.8])


def test_one_to_one_assignment_puts_two_object_sentences_on_two_regions():
    from pipeline.matching import assign_one_to_one, select_pairs

    # both sentences prefer region 0; jointly, sentence 1 takes region 1 (total 0.9 + 0.7 > 0.8 + 0.6)
    s = np.array([[0.9, 0.8], [0.6, 0.7], [0.1, 0.2]])
    assert [m["region"] for m in select_pairs(s, 0.0, 0.0, 3)] == [0, 0]
    a, b = assign_one_to_one(s, 0.0, 0.0, 3)
    assert (a["region"], b["region"]) == (0, 1) and a["kept"] and b["kept"]
    assert a["margin"] == pytest.approx(1.6 - 1.4) and b["score"] == pytest.approx(0.7)  # next best: 0.6 + 0.8
    assert b["top_regions"][0] == 0  # its own ranking is kept for analysis
    assert [m["kept"] for m in assign_one_to_one(s, 0.0, 0.25, 3)] == [False, False]  # margin 0.2 each
    # more sentences than regions: the one left over keeps its best region, not kept
    got = assign_one_to_one(np.array([[0.9, 0.8, 0.7]]), 0.0, 0.0, 3)
    assert [m["kept"] for m in got] == [True, False, False] and [m["region"] for m in got] == [0, 0, 0]


def test_one_to_one_in_the_stage_over_detector_boxes(tmp_path):
    dets = [det([0.0, 0.0, 0.45, 0.45], "square", 0.9), det([0.0, 0.55, 0.45, 1.0], "square", 0.6)]  # both red
    sents = ["A red square sits at the top.", "A red square sits at the bottom."]  # tie for the scorer and labels
    row = pair_one(tmp_path, sents, dets, threshold=0.0, margin=0.0)
    assert [m["region"] for m in row["matches"]] == [0, 0]  # independent: both on the more confident box
    row = pair_one(tmp_path, sents, dets, threshold=0.0, margin=0.0, object_assignment="one_to_one")
    assert sorted(m["region"] for m in row["matches"]) == [0, 1]


def test_one_to_one_never_gives_two_sentences_two_readings_of_one_object(tmp_path):
    # one red object read as a square (0.9) and as a circle (0.8); a second, blue square elsewhere (0.5)
    dets = [det([0.1, 0.1, 0.4, 0.4], "square", 0.9), det([0.1, 0.1, 0.4, 0.41], "circle", 0.8),
            det([0.6, 0.5, 0.9, 0.8], "square", 0.5)]
    sents = ["A red circle sits at the top.", "A red square sits at the top."]
    row = pair_one(tmp_path, sents, dets, threshold=0.0, margin=0.0, object_assignment="one_to_one")
    circle, square = row["matches"]
    assert circle["region"] == 1  # the circle reading of the red object
    assert square["region"] == 2  # not the square reading of the same object: the other square
    row = pair_one(tmp_path, sents, dets, threshold=0.0, margin=0.0, object_assignment="one_to_one",
                   dedup_iou=1.0)  # every box its own object: the square sentence takes the square reading
    assert [m["region"] for m in row["matches"]] == [1, 0]
