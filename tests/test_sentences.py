import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, SentencesSection, load_config
from pipeline.records import CAPTIONS, empty_row
from pipeline.sentences import SentenceSplitter, load_nlp, normalize

from conftest import demo_config


def captions(texts, finish=None, status="ok"):
    return pa.Table.from_pylist([empty_row(CAPTIONS, key=f"{i:04d}", captioner="c", prompt_id="p", text=t,
                                           finish_reason=finish, status=status) for i, t in enumerate(texts)],
                                schema=CAPTIONS)


@pytest.fixture(scope="module")
def splitter():
    return SentenceSplitter(SentencesSection())


def split(splitter, texts, **kw):
    return splitter.split_shard(captions(texts, **kw)).to_pylist()


TEXT = st.text(st.characters(codec="utf-8"), max_size=400) | st.lists(
    st.sampled_from(["A red cube.", "\n", "- ", "• two dogs", "1. ", "  ", "…", "!", "Mr. Smith", "😀", "\t", "**bold**"]),
    max_size=30).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=1, max_size=5))
def test_any_text_is_split_and_covered(splitter, texts):
    rows = split(splitter, texts)
    assert [r["key"] for r in rows] == [f"{i:04d}" for i in range(len(texts))]  # nothing lost
    for raw, r in zip(texts, rows):
        assert r["status"] == "ok"
        text = r["text"]
        assert text == normalize(raw) and normalize(text) == text
        last = 0
        for (a, b), s in zip(r["spans"], r["sentences"]):
            assert last <= a < b <= len(text) and text[a:b] == s == s.strip()
            last = b
        if not r["stripped"]:  # nothing removed on purpose: every non-space character is in a sentence
            covered = set()
            for a, b in r["spans"]:
                covered.update(range(a, b))
            assert all(i in covered for i, c in enumerate(text) if not c.isspace())
        assert r["excluded"] == bool(r["exclude_reasons"])


def test_newlines_and_bullets_are_boundaries(splitter):
    (r,) = split(splitter, ["Overview of the scene\n- a red cube on the left\n- a blue ball.  It   rolls.\n\n2) The end"])
    assert r["sentences"] == ["Overview of the scene", "a red cube on the left", "a blue ball.", "It rolls.", "The end"]


def test_bad_inputs_are_recorded_not_lost(splitter):
    long_caption = ("word " * 40_000).strip()  # 200k characters, no punctuation
    rows = split(splitter, ["caf\ufffd au lait, a cup on a table.", long_caption, "a dog running on the beach with no punctuation", "   \n\t ", "😀🐶🌈"])
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    bad_utf8, long, nopunct, blank, emoji = rows
    assert "invalid_utf8" in bad_utf8["flags"] and not bad_utf8["excluded"]
    assert long["n_chars"] == 199_999 and "too_long" in long["flags"]
    assert len(long["sentences"][0].split()) == 1000  # default strip cuts at max_words
    assert "truncated" in nopunct["flags"] and not nopunct["excluded"] and nopunct["n_sentences"] == 1
    assert blank["flags"] == ["empty"] and blank["excluded"] and blank["sentences"] == []
    assert "non_alpha" in emoji["flags"] and emoji["excluded"]


def test_non_utf8_bytes_are_decoded_and_flagged():
    from pipeline.sentences import decode_text

    text, bad = decode_text(b"caf\xe9 au lait")
    assert bad and text == "caf\ufffd au lait"
    assert decode_text("fine") == ("fine", False)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT | st.sampled_from(["12 34 56 78 90 a.", "a.", "don't stop", "x" * 50]), min_size=1, max_size=4))
def test_captions_stage_flags_are_the_sentences_stage_flags(splitter, texts):
    from pipeline.mllm import caption_flags

    for raw, r in zip(texts, split(splitter, texts, finish="stop")):
        assert caption_flags(splitter.quality, raw, "stop") == r["flags"], raw


def test_alpha_fraction_counts_letters_not_alpha_tokens(splitter):
    (r,) = split(splitter, ["12 34 56 78 90 a."])
    assert r["alpha_frac"] == pytest.approx(1 / 12, abs=1e-4) and r["flags"] == ["non_alpha"]  # not "empty": it has a letter


def test_quality_flags_measure_values(splitter):
    rows = split(splitter, [
        "The image shows a red cube on a wooden table next to a lamp.",
        "In this image, we can see a cat sleeping on a soft sofa.",
        "A cat. A cat. A cat. A cat. A cat. A cat. A cat. A cat.",
        "Two cats.",
        "%%% ### 1234 5678 @@@ !!! a",
    ])
    bp, bp2, loop, short, junk = rows
    assert bp["boilerplate"] == "The image shows " and bp["sentences"] == ["a red cube on a wooden table next to a lamp."]
    assert bp["stripped"] == ["boilerplate: 'The image shows'"] and not bp["excluded"]
    assert bp2["sentences"] == ["a cat sleeping on a soft sofa."]
    assert loop["repetition"] > 0.6 and loop["excluded"] and "repetition" in loop["exclude_reasons"]
    assert short["n_words"] == 2 and short["exclude_reasons"] == ["too_few_words"]
    assert junk["alpha_frac"] < 0.1 and "non_alpha" in junk["flags"]


def test_actions_from_config(splitter):
    cfg = SentencesSection(quality={"actions": {"repetition": "strip", "truncated": "strip", "boilerplate": "keep"}})
    s = SentenceSplitter(cfg)
    loop, trunc, bp = s.split_shard(captions([
        "A cat sits on a mat. A cat sits on a mat. A cat sits on a mat. A cat sits on a mat.",
        "A red cube on a table. A blue ball next to it. And then the",
        "The image shows a red cube on a wooden table.",
    ])).to_pylist()
    assert loop["sentences"] == ["A cat sits on a mat."] and not loop["excluded"]
    assert loop["stripped"] == ["repetition: 3 repeated sentence(s)"]
    assert trunc["sentences"] == ["A red cube on a table.", "A blue ball next to it."]
    assert bp["sentences"] == ["The image shows a red cube on a wooden table."] and "boilerplate" in bp["flags"]
    (gen,) = s.split_shard(captions(["A red cube on a table. A blue ball."], finish="length")).to_pylist()
    assert gen["truncated"] == "hit the token limit"


def test_skipped_captions_stay_accounted(splitter):
    (r,) = split(splitter, ["whatever"], status="skipped")
    assert r["status"] == "skipped" and r["excluded"] and r["sentences"] is None


def test_config_rejects_bad_actions_and_regexes(tmp_path):
    base = demo_config(tmp_path)
    for quality, msg in [({"actions": {"empty": "strip"}}, "'empty' cannot be stripped"),
                         ({"actions": {"loud": "keep"}}, "unknown flag 'loud'"),
                         ({"actions": {"empty": "drop"}}, "'keep', 'strip' or 'exclude'"),
                         ({"openings": ["(unclosed"]}, "not a valid regex")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(data={**base, "sentences": {"quality": quality}})


def test_unknown_spacy_pipeline_is_a_clear_error():
    with pytest.raises(ValueError, match="spaCy pipeline 'xx_not_installed' is not installed"):
        load_nlp("xx_not_installed")


@pytest.mark.parametrize("text, want", [
    ("Prof. Adeyemi waves at the camera. Behind her, a bus pulls away",
     ["Prof. Adeyemi waves at the camera.", "Behind her, a bus pulls away"]),
    ("A jar holds approx. 40 marbles... Some are chipped. The jar sits on No. 9 of the shelf list.",
     ["A jar holds approx. 40 marbles...", "Some are chipped.", "The jar sits on No. 9 of the shelf list."]),
    ("A note says \"Gone fishing!\" in red. (It looks old.) Cans, nets, etc. lie around; see www.x.org/a.b. A dog.",
     ["A note says \"Gone fishing!\" in red.", "(It looks old.)", "Cans, nets, etc. lie around; see www.x.org/a.b.",
      "A dog."]),
    ("The sign by E. L. Ortiz reads 4.5 km to the U.S. border. The clock says 9:05 p.m.\nItems:\n- a lamp\n- a mug.",
     ["The sign by E. L. Ortiz reads 4.5 km to the U.S. border.", "The clock says 9:05 p.m.", "Items:", "a lamp",
      "a mug."]),
])
def test_rule_segmenter_on_cases_outside_the_labelled_set(splitter, text, want):
    (r,) = split(splitter, [text])
    assert r["sentences"] == want


def test_other_space_is_every_whitespace_but_space_and_newline():
    import re
    import sys

    from pipeline.sentences import _ODD, _OTHER_SPACE

    want = {chr(c) for c in range(sys.maxunicode + 1) if re.match(r"\s", chr(c))} - {" ", "\n"}
    for c in range(sys.maxunicode + 1):
        ch = chr(c)
        assert (_OTHER_SPACE.match(ch) is not None) == (ch in want), hex(c)
        assert (_ODD.match(ch) is not None) == (ch in want or re.match(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f"
                                                                      r"\u2028\u2029\ufeff]", ch) is not None), hex(c)


def _reference_split(texts, nlp, n):
    """split_docs as it was written first: nlp.pipe, doc.sents, np.unique, quality.alpha_fraction on doc.text."""
    import numpy as np
    from spacy.attrs import IS_PUNCT, IS_SPACE, LOWER

    from pipeline.quality import alpha_fraction

    out = []
    for text, doc in zip(texts, nlp.pipe(texts)):
        spans = []
        for sent in doc.sents:
            a, b = sent.start_char, sent.end_char
            raw = text[a:b]
            a += len(raw) - len(raw.lstrip())
            b -= len(raw) - len(raw.rstrip())
            if b > a:
                spans.append((a, b))
        if len(doc) == 0:
            out.append((spans, {"n_words": 0, "alpha_frac": 0.0, "repetition": 0.0}))
            continue
        punct, space, lower = doc.to_array([IS_PUNCT, IS_SPACE, LOWER]).T
        words = lower[(space == 0) & (punct == 0)]
        rep = 0.0
        if len(words) >= n:
            grams = np.zeros(len(words) - n + 1, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for i in range(n):
                    grams = grams * np.uint64(1_000_003) + words[i:len(words) - n + 1 + i]
            rep = 1.0 - len(np.unique(grams)) / len(grams)
        out.append((spans, {"n_words": int(len(words)), "alpha_frac": round(alpha_fraction(doc.text), 4),
                            "repetition": round(rep, 4)}))
    return out


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXT | st.sampled_from(["A cat. A cat. A cat. A cat. A cat. A cat.", "ÉTÉ à Paris. Oui!", ""]),
                      min_size=1, max_size=5),
       segmenter=st.sampled_from(["rules", "sentencizer"]), n=st.sampled_from([1, 2, 4]),
       batch_size=st.sampled_from([1, 3, 256]))
def test_split_docs_fast_paths_match_the_plain_spacy_reading(texts, segmenter, n, batch_size):
    from pipeline.sentences import split_docs, text_measures

    texts = [normalize(t) for t in texts] + texts  # the stage's input, and raw text (model/evaluate.py's)
    nlp = load_nlp("blank:en", segmenter)
    want = _reference_split(texts, nlp, n)
    assert split_docs(texts, nlp, batch_size=batch_size, repetition_n=n) == want
    assert [text_measures(t, n) for t in texts] == [m for _, m in want]  # the captions stage's measures


@pytest.mark.parametrize("segmenter", ["rules", "sentencizer"])
def test_a_shard_leaves_no_cycles_and_the_collector_as_it_was(segmenter):
    """The stage pauses the cyclic collector while it splits a shard: that is only free if it makes no cycles."""
    import gc

    s = SentenceSplitter(SentencesSection(segmenter=segmenter))
    table = captions(["The image shows a red cube. It is shiny!", "A cat. A cat. A cat. A cat. A cat. A cat.", "",
                      "- a lamp\n- a mug", "caf\ufffd au lait (approx. 3 cups)... Dr. Lee waves."] * 20)
    s.split_shard(table)  # warm-up: spaCy's lazily built state
    gc.collect()
    gc.disable()
    try:
        out = s.split_shard(table)
        assert not gc.isenabled()  # left as it was (off)
        del out
        assert gc.collect() == 0
    finally:
        gc.enable()
    s.split_shard(table)
    assert gc.isenabled()
