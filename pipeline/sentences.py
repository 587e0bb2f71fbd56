"""Sentences stage: normalise captions, split them into sentences with spaCy, measure quality.

Text is Unicode-normalised (NFKC), control characters and runs of whitespace
are cleaned, list bullets are removed; newlines are sentence boundaries. The
split itself is a spaCy component (default: longcap's rules, pipeline/segmenters.py). The
sentences, joined back, cover every non-space character of the normalised
caption unless a `strip` action removed text on purpose (recorded in `stripped`).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import re
import unicodedata

import numpy as np

import pyarrow as pa

from .quality import QualityChecker, alpha_fraction
from .records import FAILED, OK, SENTENCES, SKIPPED, table

_CONTROL_CHARS = r"\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\ufeff"
_CONTROL = re.compile(f"[{_CONTROL_CHARS}]")
_SPACES = re.compile(r"[^\S\n]{2,}|[^\S\n ]")  # runs of spaces, or any other non-newline whitespace
_BULLET = re.compile(r"^(?:(?:[-*•·▪‣◦]|\d{1,3}[.)]|#{1,6})\s+)+")
_EMPHASIS = re.compile(r"\*\*|__")
# every whitespace character (str.isspace, which is what \s matches) but the space and the newline: with no such
# character and no two spaces in a row, _SPACES has nothing to replace (a scan for these is 4x faster than _SPACES)
_OTHER_SPACES = "\t\x0b\x0c\r\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_OTHER_SPACE = re.compile(f"[{_OTHER_SPACES}]")
_ODD = re.compile(f"[{_CONTROL_CHARS}{_OTHER_SPACES}]")  # either kind: one scan where most captions have neither


def decode_text(value) -> tuple[str, bool]:
    """Text from a str or bytes value; bytes that are not UTF-8 are decoded with replacement (flag True)."""
    if value is None:
        return "", False
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), False
        except UnicodeDecodeError:
            return bytes(value).decode("utf-8", errors="replace"), True
    return str(value), False


def normalize(text: str) -> str:
    """NFKC, no control characters, single spaces, no list bullets or bold markers, one line per line."""
    if not unicodedata.is_normalized("NFKC", text):
        text = unicodedata.normalize("NFKC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    odd = _ODD.search(text) is not None
    if odd and _CONTROL.search(text):
        text = _CONTROL.sub(" ", text)
    if "**" in text or "__" in text:
        text = _EMPHASIS.sub("", text)
    if "  " in text or (odd and _OTHER_SPACE.search(text)):
        text = _SPACES.sub(" ", text)
    if "\n" not in text:
        return _BULLET.sub("", text.strip())
    lines = (_BULLET.sub("", line.strip()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _newline_boundaries(doc):
    """A spaCy component: the token after a newline starts a sentence (newlines are whitespace tokens)."""
    from spacy.attrs import IS_SPACE

    if len(doc) < 2:
        return doc
    for i in doc.to_array([IS_SPACE]).nonzero()[0]:
        if i + 1 < len(doc) and "\n" in doc[int(i)].text:
            doc[int(i) + 1].is_sent_start = True
    return doc


SEGMENTERS = ("rules", "sentencizer", "pysbd", "nupunkt", "pipeline")


@functools.lru_cache(maxsize=8)
def load_nlp(name: str = "blank:en", segmenter: str = "rules"):
    """A spaCy pipeline that splits sentences. `name`: 'blank:en' (tokenizer only) or an installed pipeline;
    `segmenter`: rules (pipeline/segmenters.py, the default), sentencizer (spaCy's), pysbd, nupunkt, or
    pipeline (the installed pipeline's own parser/senter). Line breaks are boundaries with every segmenter."""
    import spacy
    from spacy.language import Language

    from .segmenters import COMPONENTS, register

    if segmenter not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {segmenter!r}; known: {', '.join(SEGMENTERS)}")
    if "longcap_newlines" not in Language.factories:
        Language.component("longcap_newlines", func=_newline_boundaries)
    register()
    if name.startswith("blank:"):
        if segmenter == "pipeline":
            raise ValueError("segmenter 'pipeline' needs an installed spaCy pipeline in spacy_model, not blank")
        nlp = spacy.blank(name.split(":", 1)[1])
    else:
        drop = ["ner", "lemmatizer", "textcat"] + ([] if segmenter == "pipeline" else ["parser", "senter"])
        try:
            nlp = spacy.load(name, exclude=drop)
        except OSError as e:
            raise ValueError(f"spaCy pipeline {name!r} is not installed ({e}); use 'blank:en' or install it") from None
        if segmenter == "pipeline" and not ({"parser", "senter"} & set(nlp.pipe_names)):
            raise ValueError(f"spaCy pipeline {name!r} has no parser or senter: {nlp.pipe_names}")
    if segmenter in COMPONENTS:
        nlp.add_pipe(COMPONENTS[segmenter][0])
    else:
        if segmenter == "sentencizer":
            nlp.add_pipe("sentencizer")
        nlp.add_pipe("longcap_newlines", first=True)
    nlp.max_length = 10_000_000
    return nlp


def split_docs(texts: list[str], nlp, batch_size: int = 256, repetition_n: int = 4) -> list:
    """Per text: (sentence spans with whitespace trimmed, token measures from spaCy's arrays).

    The spans are doc.sents' (token i > 0 starts a sentence where its SENT_START is 1), read with the measures'
    attributes in one `Doc.to_array`; a sentence's end is the next one's start, which differs from Span.end_char
    only by the whitespace that is trimmed anyway. The measures are computed batch_size docs at a time."""
    from spacy.attrs import IDX, IS_PUNCT, IS_SPACE, LOWER, SENT_START

    attrs = [IDX, SENT_START, IS_PUNCT, IS_SPACE, LOWER]
    out, spans, cols, done = [], [], [], []
    for text, doc in zip(texts, _docs(texts, nlp, batch_size)):
        done.append(text)
        if len(doc) == 0:
            spans.append([])
            cols.append(None)
        elif "sents" in doc.user_hooks or not doc.has_annotation("SENT_START"):
            spans.append(_trimmed(text, [(s.start_char, s.end_char) for s in doc.sents]))  # raises without any
            cols.append(doc.to_array(attrs)[:, 2:])
        else:
            arr = doc.to_array(attrs)
            starts = arr[1:, 0][arr[1:, 1] == 1].tolist()
            spans.append(_trimmed(text, zip([0] + starts, starts + [len(text)])))
            cols.append(arr[:, 2:])
        if len(done) >= batch_size:
            out.extend(zip(spans, _batch_measures(cols, done, repetition_n)))
            spans, cols, done = [], [], []
    out.extend(zip(spans, _batch_measures(cols, done, repetition_n)))
    return out


def _docs(texts, nlp, batch_size):
    """nlp.pipe(texts); where every component is a plain function (blank:en with longcap's rules, pysbd or
    nupunkt), the same thing done here: make_doc, then each component in order, given the text when it takes it
    (`with_text`, pipeline/segmenters.py) so that it need not rebuild it from the tokens."""
    procs = [proc for _, proc in nlp.pipeline]
    if any(hasattr(proc, "pipe") for proc in procs):  # trained components and the sentencizer batch: nlp.pipe
        yield from nlp.pipe(texts, batch_size=batch_size)
        return
    procs = [getattr(proc, "with_text", None) or (lambda doc, text, proc=proc: proc(doc)) for proc in procs]
    make_doc = nlp.make_doc
    for text in texts:
        doc = make_doc(text)
        for proc in procs:
            doc = proc(doc, text)
        yield doc


def _trimmed(text: str, bounds) -> list[tuple[int, int]]:
    spans = []
    for a, b in bounds:
        raw = text[a:b]
        lead, end = len(raw) - len(raw.lstrip()), len(raw.rstrip())
        if end > lead:
            spans.append((a + lead, a + end))
    return spans


def token_measures(doc, n: int, text: str | None = None) -> dict:
    """Word count, letters / visible characters (counted by character: "a." has one letter), and the word
    n-gram repetition ratio, vectorised. `text`: doc.text where the caller has it (Doc.text joins every token)."""
    from spacy.attrs import IS_PUNCT, IS_SPACE, LOWER

    if len(doc) == 0:
        return _batch_measures([None], [""], n)[0]
    return _batch_measures([doc.to_array([IS_PUNCT, IS_SPACE, LOWER])], [doc.text if text is None else text], n)[0]


def _batch_measures(cols: list, texts: list[str], n: int) -> list[dict]:
    """token_measures of many docs from their [IS_PUNCT, IS_SPACE, LOWER] columns (None: an empty doc): masks,
    word counts and n-gram hashes over the docs' columns put together, then one in-place sort per doc's n-grams
    and the distinct ones counted for all at once (numpy calls per doc cost more than the work on ~200 tokens)."""
    k = len(cols)
    n_words, grams_per_doc, distinct = [0] * k, [0] * k, [0] * k
    lens = [0 if c is None else len(c) for c in cols]
    if any(lens):
        tokens = np.concatenate([c for c in cols if c is not None and len(c)])
        is_word = ~(tokens[:, 0] | tokens[:, 1]).astype(bool)  # neither punctuation nor space
        words, words_of = tokens[:, 2][is_word], np.repeat(np.arange(k), lens)[is_word]  # and the doc of each
        n_words = np.bincount(words_of, minlength=k).tolist()
        m = len(words) - n + 1
        if m > 0:
            inside = words_of[:m] == words_of[n - 1:]  # the n-gram starting here lies in one doc
            grams = words[:m].copy()
            with np.errstate(over="ignore"):
                for i in range(1, n):
                    grams *= _GRAM_BASE
                    grams += words[i:m + i]
            grams, owner = grams[inside], words_of[:m][inside]  # owner ascending: each doc's n-grams together
            counts = np.bincount(owner, minlength=k)
            end = 0
            for c in counts.tolist():
                if c > 1:
                    grams[end:end + c].sort()
                end += c
            new = np.ones(len(grams), dtype=bool)
            new[1:] = (grams[1:] != grams[:-1]) | (owner[1:] != owner[:-1])
            grams_per_doc, distinct = counts.tolist(), np.bincount(owner[new], minlength=k).tolist()
    out = []
    for c, text, w, g, d in zip(cols, texts, n_words, grams_per_doc, distinct):
        if c is None:
            out.append({"n_words": 0, "alpha_frac": 0.0, "repetition": 0.0})
            continue
        rep = 1.0 - d / g if g > 0 else 0.0  # 1 - distinct n-grams / n-grams
        out.append({"n_words": w, "alpha_frac": round(_alpha_fraction(text), 4), "repetition": round(rep, 4)})
    return out


_GRAM_BASE = np.uint64(1_000_003)
_ASCII_ALPHA = bytes(c for c in range(128) if chr(c).isalpha())
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())


def _alpha_fraction(text: str) -> float:
    """quality.alpha_fraction, counted by bytes.translate for ASCII text (str.isalpha/isspace agree on it)."""
    if not text.isascii():
        return alpha_fraction(text)
    b = text.encode("ascii")
    visible = len(b.translate(None, _ASCII_SPACE))
    return (len(b) - len(b.translate(None, _ASCII_ALPHA))) / visible if visible else 0.0


def text_measures(text: str, n: int) -> dict:
    """token_measures of one text, tokenised only: the numbers the stage's split gives it."""
    return token_measures(load_nlp("blank:en").make_doc(text), n, text)


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off for the duration (back on after, if it was on). A shard allocates
    tens of thousands of small containers (rows, sentence and span lists), which set off the collector's passes,
    full ones included, over every object of the process: 10-20% of the stage's time on 4,000 long captions
    (BENCHMARKS.md), for nothing, as the stage makes no reference cycles (blank spaCy Docs are freed by reference
    counting; tests/test_sentences.py checks that a shard leaves no garbage for the collector)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


class SentenceSplitter:
    """The stage's logic over a captions table (no Ray, no files)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.nlp = load_nlp(cfg.spacy_model, cfg.segmenter)
        self.quality = QualityChecker(cfg.quality)

    def split_shard(self, captions: pa.Table) -> pa.Table:
        with _collector_paused():
            return self._split_shard(captions)

    def _split_shard(self, captions: pa.Table) -> pa.Table:
        rows = captions.select(["key", "captioner", "prompt_id", "text", "finish_reason", "status", "error"]).to_pylist()
        todo, texts = [], []
        out = []
        for r in rows:
            row = {"key": r["key"], "captioner": r["captioner"], "prompt_id": r["prompt_id"]}  # table(): absent = null
            if r["status"] != OK:
                row.update(status=SKIPPED, error=f"caption not ok ({r['status']}): {r['error']}",
                           excluded=True, exclude_reasons=["no caption"])
                out.append(row)
                continue
            raw, bad_utf8 = decode_text(r["text"])
            bad_utf8 = bad_utf8 or "\ufffd" in raw  # replacement characters: bytes that were not UTF-8
            text = normalize(raw)
            row.update(text=text, invalid_utf8=bad_utf8)
            todo.append((row, r["finish_reason"]))
            texts.append(text)
            out.append(row)
        n = self.cfg.quality.repetition_n
        try:
            results = split_docs(texts, self.nlp, self.cfg.batch_size, n)
        except Exception:  # noqa: BLE001 - one bad caption must not take the shard down: one by one
            results = [self._split_one(t) for t in texts]
        for (row, finish), body, res in zip(todo, texts, results):
            if isinstance(res, str):
                row.update(status=FAILED, error=res, excluded=True, exclude_reasons=["split failed"])
                continue
            self.quality.apply(row, body, res[0], finish, res[1])
            row["status"] = OK
        return table(out, SENTENCES)

    def _split_one(self, text: str):
        try:
            return split_docs([text], self.nlp, repetition_n=self.cfg.quality.repetition_n)[0]
        except Exception as e:  # noqa: BLE001 - recorded per caption
            return f"sentence split failed: {type(e).__name__}: {e}"
