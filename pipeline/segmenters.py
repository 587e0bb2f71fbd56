"""Sentence segmenters as spaCy components, so the sentences stage keeps spaCy's Doc spans whatever splits.

`longcap_rules` (the default) finds boundaries with one regular expression over the text and a few rules of
ours for caption text (written for, and measured on, tests/data/sentences_gold.jsonl; see BENCHMARKS.md):
- a line break always ends a sentence;
- after . ! ? or an ellipsis (with any closing quotes or brackets), whitespace and then a lowercase letter:
  no boundary ('reads "Welcome home!" above the door', 'e.g. apples', 'loading... while');
- after a full stop: no boundary after titles and prefix abbreviations (Dr., St., Mr., No., Vol., Fig., vs.,
  approx., e.g., ...), after initials (J. R. Miller, J.K. Rowling; not U.S./U.K.), or after a day or month
  abbreviation followed by a number (Sat. 10 to 2);
- anything else: a boundary (so "etc. All", "7:30 a.m. Breakfast", '"Cash only." The', "tickets. A").
`longcap_pysbd` and `longcap_nupunkt` wrap pysbd and nupunkt (extras, for the comparison); every component also
makes line breaks boundaries, as the stage promises.
"""

from __future__ import annotations

import functools
import re

import numpy as np

_CANDIDATE = re.compile(r"[.!?…][\"'”’»)\]]*\s+(?=\S)")  # a character class first: fast to scan for
_NEWLINE = re.compile(r"\n\s*(?=\S)")
_CLOSERS = "\"'”’»)]"
NEVER_END = frozenset("mr mrs ms dr st prof mt sgt capt gen rev no nos vol vols fig figs vs approx e.g i.e cf "
                      "ca esp incl dept est".split())  # abbreviations a name, number or phrase always follows
DATEISH = frozenset("mon tue tues wed thu thur thurs fri sat sun jan feb mar apr jun jul aug sep sept oct nov dec"
                    .split())  # no boundary before a number: "Sat. 10 to 2", "Oct. 3"
ENDING_INITIALS = frozenset("u.s u.k u.s.a e.u u.n d.c".split())  # dotted capitals that do end sentences
_INITIALS = re.compile(r"(?:[A-Z]\.)*[A-Z]")
_LEAD = "\"'“‘«([{"
_NOT_START = np.uint64(2**64 - 1)  # -1 as spaCy's uint64 arrays hold it


def rule_starts(text: str) -> list[int]:
    """Character offsets where a sentence starts (besides 0), in order."""
    starts = []
    for m in _CANDIDATE.finditer(text):
        end = m.end()
        if text[end].islower() and "\n" not in m.group():
            continue
        a = m.start()
        if text[a] == "." and text[a + 1] not in _CLOSERS and text[a - 1:a] != "." and "\n" not in m.group():
            w = text[max(text.rfind(" ", 0, a), text.rfind("\n", 0, a)) + 1:a].lstrip(_LEAD)
            low = w.lower()
            if low in NEVER_END:
                continue
            if w[:1].isupper() and _INITIALS.fullmatch(w) and low not in ENDING_INITIALS:
                continue
            if text[end].isdigit() and low.rsplit("-", 1)[-1].rstrip(".") in DATEISH:
                continue
        starts.append(end)
    if "\n" in text:  # line breaks without punctuation before them
        starts = sorted(set(starts).union(m.end() for m in _NEWLINE.finditer(text)))
    return starts


def newline_starts(text: str) -> list[int]:
    return [m.end() for m in _NEWLINE.finditer(text)]


def set_starts(doc, starts) -> None:
    """Token starts at these character offsets begin sentences; no other token does."""
    from spacy.attrs import IDX, SENT_START

    if len(doc) == 0:
        return
    idx = doc.to_array(IDX)  # token start offsets, ascending
    flags = np.full((len(idx), 1), _NOT_START, dtype=np.uint64)
    if starts:
        at = np.searchsorted(idx, starts)  # every start offset begins a token (whitespace comes before it)
        flags[at[at < len(idx)]] = 1
    flags[0] = 1
    doc.from_array([SENT_START], flags)


def rules_component(doc):
    return _rules(doc, doc.text)


def _rules(doc, text):
    set_starts(doc, rule_starts(text))
    return doc


# Every component here reads the text, and `Doc.text` rebuilds it by joining every token (as long as the tokenizer
# itself on long captions). `with_text(doc, text)`: the same component given the text the Doc was made from, which
# the sentences stage has (pipeline/sentences.py split_docs); spaCy calls the component itself.
rules_component.with_text = _rules


@functools.lru_cache(maxsize=1)
def _pysbd():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False, char_span=True)


def pysbd_component(doc):
    return _pysbd_split(doc, doc.text)


def _pysbd_split(doc, text):
    starts = {s.start + len(s.sent) - len(s.sent.lstrip()) for s in _pysbd().segment(text)}
    set_starts(doc, sorted(starts | set(newline_starts(text))))
    return doc


def nupunkt_component(doc):
    return _nupunkt_split(doc, doc.text)


def _nupunkt_split(doc, text):
    import nupunkt

    starts = {a + len(text[a:b]) - len(text[a:b].lstrip()) for a, b in nupunkt.sent_spans(text)}
    set_starts(doc, sorted(starts | set(newline_starts(text))))
    return doc


pysbd_component.with_text = _pysbd_split
nupunkt_component.with_text = _nupunkt_split


COMPONENTS = {"rules": ("longcap_rules", rules_component), "pysbd": ("longcap_pysbd", pysbd_component),
              "nupunkt": ("longcap_nupunkt", nupunkt_component)}


def register() -> None:
    from spacy.language import Language

    for name, func in COMPONENTS.values():
        if name not in Language.factories:
            Language.component(name, func=func)
