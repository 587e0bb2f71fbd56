"""Sentence kinds for local pairs: object, relation, scene, other; with the noun phrases each kind pairs by.

From spaCy tokens. With a pipeline that parses (`regions.kinds_spacy_model`), noun phrases are
`doc.noun_chunks` and heads their root lemmas; with `blank:en` (the default: tokens only) our
rules stand in: a noun phrase is a determiner or number and the content words after it (up to a
stop word, punctuation, a common verb or an -ing word), its heads are its words found in the
label vocabulary (detector classes and synonyms), else its last word; lemmas by rule (plurals).

Kinds (our reading; the paper-free part of local pairs):
- scene: every noun phrase names the scene ("The background is beige.", "The sky is clear.");
- relation: two or more object phrases and a spatial relation phrase ("left of", "above", ...);
  it pairs by its subject (the first object phrase) and the first object phrase after the relation;
- object: at least one object phrase; its main object is the first one;
- other: no noun phrase naming an object or the scene.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

OBJECT, RELATION, SCENE, OTHER = "object", "relation", "scene", "other"
KINDS = (OBJECT, RELATION, SCENE, OTHER)

SCENE_NOUNS = {"background", "backdrop", "scene", "setting", "sky", "image", "picture", "photo", "photograph",
               "foreground", "surroundings", "landscape", "view", "scenery", "environment", "atmosphere"}
# place words: "the top left", "the left of", "the middle"; they locate, they are not objects
SPATIAL_NOUNS = {"left", "right", "top", "bottom", "middle", "center", "centre", "corner", "side", "front",
                 "back", "edge", "rear", "row", "column", "half", "part", "area", "position", "upper", "lower"}
RELATIONS = ("to the left of", "to the right of", "on the left of", "on the right of", "left of", "right of",
             "in front of", "on top of", "next to", "close to", "adjacent to", "across from", "behind", "above",
             "below", "beneath", "underneath", "under", "over", "beside", "besides", "near", "between",
             "alongside", "opposite", "on", "atop", "against", "inside", "within")
DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "another", "some", "his", "her", "its", "their",
               "my", "your", "our", "each", "every", "several", "many", "few", "both", "one", "two", "three",
               "four", "five", "six", "seven", "eight", "nine", "ten", "no"}
VERBS = {"is", "are", "was", "were", "be", "stands", "stand", "sits", "sit", "lies", "lie", "rests", "rest",
         "hangs", "hang", "appears", "appear", "walks", "walk", "runs", "run", "holds", "hold", "looks", "look",
         "has", "have", "shows", "show", "contains", "contain", "waits", "wait", "plays", "play", "stays",
         "floats", "float", "leans", "lean", "faces", "face", "grazes", "graze", "flies", "fly", "seems"}
IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child", "mice": "mouse",
             "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "leaves": "leaf",
             "wolves": "wolf", "sheep": "sheep", "fish": "fish", "glasses": "glass", "buses": "bus"}
# built-in synonyms per detector class (COCO-style names); regions.synonyms extends them
SYNONYMS = {"person": ["man", "woman", "boy", "girl", "child", "kid", "people", "lady", "guy", "player", "rider",
                       "pedestrian", "skier", "surfer", "baby"],
            "bicycle": ["bike", "cycle"], "motorcycle": ["motorbike", "scooter"], "airplane": ["plane", "aircraft",
            "jet", "airliner"], "car": ["automobile", "vehicle", "taxi"], "tv": ["television", "monitor", "screen"],
            "couch": ["sofa"], "cell phone": ["phone", "smartphone", "cellphone", "mobile"], "cup": ["mug"],
            "dining table": ["table"], "laptop": ["computer", "notebook"], "sports ball": ["ball", "football"],
            "potted plant": ["plant"], "handbag": ["bag", "purse"], "bus": ["coach"], "boat": ["ship"]}
_WORD = re.compile(r"[a-z]+( [a-z]+)*")


def is_word(name: str) -> bool:
    """A class name that can be compared with words ('person', 'traffic light'; not '0' or 'cls_3')."""
    return bool(_WORD.fullmatch(name.strip().lower()))


def rule_lemma(word: str) -> str:
    """Noun lemma by rule: irregular plurals, then -ies, -(s|sh|ch|x|z)es, -s (not -ss, -us, -is)."""
    w = word.lower()
    if w in IRREGULAR:
        return IRREGULAR[w]
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and re.search(r"(s|sh|ch|x|z)es$", w):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


@dataclass
class Phrase:
    text: str
    heads: list[str]  # lemmas
    start: int  # token index
    role: str  # object, scene or place


@dataclass
class SentenceKind:
    kind: str
    phrases: list[Phrase] = field(default_factory=list)  # object phrases in order
    pair: tuple[int, int] | None = None  # relation: indices into phrases of its two objects

    @property
    def heads(self) -> list[str]:
        """Head lemmas of the main object first, then the others."""
        return [h for p in self.phrases for h in p.heads]


class KindClassifier:
    def __init__(self, spacy_model: str = "blank:en", labels: list[str] = (), synonyms: dict | None = None):
        import spacy

        if spacy_model.startswith("blank:"):
            self.nlp = spacy.blank(spacy_model.split(":", 1)[1])
        else:
            try:
                self.nlp = spacy.load(spacy_model, exclude=["ner", "textcat"])
            except OSError as e:
                raise ValueError(f"regions.kinds_spacy_model {spacy_model!r} is not installed: {e}") from None
        self.parsed = "parser" in self.nlp.pipe_names
        self.lemmatized = "lemmatizer" in self.nlp.pipe_names
        self.words = {}  # word lemma -> class names it names
        for name in labels:
            self.add_label(name, SYNONYMS.get(name, []) + list((synonyms or {}).get(name, [])))
        self.cache: dict[str, SentenceKind] = {}

    def add_label(self, name: str, synonyms: list[str]) -> None:
        """Words that name a detector class: its last word and its synonyms, as lemmas."""
        for w in [name.split()[-1], *synonyms]:
            self.words.setdefault(rule_lemma(w.split()[-1]), set()).add(name)

    def _lemma(self, tok) -> str:
        return tok.lemma_.lower() if self.lemmatized and tok.lemma_ else rule_lemma(tok.text)

    def classify(self, texts: list[str]) -> list[SentenceKind]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        for t, doc in zip(todo, self.nlp.pipe(todo)):
            self.cache[t] = self._kind(doc)
        return [self.cache[t] for t in texts]

    def _phrases(self, doc) -> list[Phrase]:
        if self.parsed:
            return [self._phrase(doc, c.start, c.end, [self._lemma(c.root)]) for c in doc.noun_chunks]
        out, i = [], 0
        while i < len(doc):
            t = doc[i]
            if t.lower_ in DETERMINERS or t.like_num:
                j = i + 1
                while j < len(doc) and self._content(doc[j], first=j == i + 1):
                    j += 1
                if j > i + 1:
                    out.append(self._phrase(doc, i, j, None))
                i = j
            elif self._lemma(t) in self.words and self._content(t, first=True):  # a bare noun ("dogs play")
                out.append(self._phrase(doc, i, i + 1, None))
                i += 1
            else:
                i += 1
        return out

    def _content(self, tok, first: bool) -> bool:
        w = tok.lower_
        if tok.is_punct or tok.is_space or not tok.is_alpha or w in VERBS or w in DETERMINERS:
            return False
        if tok.is_stop and w not in SPATIAL_NOUNS | {"front", "back", "top", "bottom"}:
            return False
        return first or not w.endswith("ing")

    def _phrase(self, doc, start: int, end: int, heads: list[str] | None) -> Phrase:
        lemmas = [self._lemma(t) for t in doc[start:end] if t.is_alpha]
        if heads is None:  # no parse: the words the labels know, else the last word
            heads = [w for w in lemmas if w in self.words] or lemmas[-1:]
        if heads and all(h in SCENE_NOUNS for h in heads):
            role = "scene"
        elif heads and all(h in SPATIAL_NOUNS for h in heads):
            role = "place"
        else:
            role = "object"
        return Phrase(doc[start:end].text, heads, start, role)

    def _relation_at(self, doc) -> int | None:
        """Token index where the first spatial relation phrase starts, or None."""
        words = [t.lower_ for t in doc]
        for i in range(len(words)):
            for rel in RELATIONS:
                r = rel.split()
                if words[i:i + len(r)] == r:
                    return i
        return None

    def _kind(self, doc) -> SentenceKind:
        phrases = self._phrases(doc)
        objects = [p for p in phrases if p.role == "object"]
        if not objects:
            return SentenceKind(SCENE if any(p.role == "scene" for p in phrases) else OTHER, [])
        rel = self._relation_at(doc)
        if len(objects) >= 2 and rel is not None:
            after = [k for k, p in enumerate(objects) if p.start > rel]
            return SentenceKind(RELATION, objects, (0, after[0] if after and after[0] > 0 else 1))
        return SentenceKind(OBJECT, objects)

    def agreement(self, kind: SentenceKind, class_name: str) -> float:
        """1 when the class names the sentence's main object, 0.5 another of its objects, else 0."""
        for k, p in enumerate(kind.phrases):
            if self.names(p, class_name):
                return 1.0 if k == 0 else 0.5
        return 0.0

    def names(self, phrase: Phrase, class_name: str) -> bool:
        """Whether a phrase's head is the class name (its last word: 'traffic light' -> light) or a synonym."""
        return any(class_name in self.words.get(h, ()) for h in phrase.heads)
