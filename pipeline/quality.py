"""Caption quality: measured values, flags, and the keep / strip / exclude action per flag."""

from __future__ import annotations

import re

TERMINAL = tuple(".!?…。！？\"'”’)]»")
FLAGS = ("empty", "too_few_words", "repetition", "truncated", "too_long", "non_alpha", "boilerplate", "invalid_utf8")
STRIPPABLE = {"boilerplate", "repetition", "truncated", "too_long"}
DEFAULT_ACTIONS = {"empty": "exclude", "too_few_words": "exclude", "repetition": "exclude", "truncated": "keep",
                   "too_long": "strip", "non_alpha": "exclude", "boilerplate": "strip", "invalid_utf8": "keep"}
DEFAULT_OPENINGS = (
    r"(?:the|this) (?:image|picture|photo|photograph|scene|illustration) (?:shows|depicts|features|displays|"
    r"captures|presents|showcases|portrays|contains|is of|is)\b[\s,:]*",
    r"in (?:the|this) (?:image|picture|photo|photograph|scene),?\s*(?:we can see|there is|there are|you can see)?\s*",
    r"(?:here is|this is) (?:an?|the) (?:image|picture|photo|photograph) of\s*",
    r"the image you(?:'ve| have) (?:provided|shared) (?:shows|depicts)\s*",
)


def repetition_ratio(words: list[str], n: int) -> float:
    """1 - distinct/total word n-grams: 0 for text without repeats, near 1 for a loop."""
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n))))
    return 1.0 - len(set(grams)) / len(grams)


def alpha_fraction(text: str) -> float:
    visible = len(text) - sum(map(str.isspace, text))
    return sum(map(str.isalpha, text)) / visible if visible else 0.0


class QualityChecker:
    def __init__(self, cfg):
        self.cfg = cfg
        self.actions = {**DEFAULT_ACTIONS, **cfg.actions}
        self.opening = re.compile("^(?:" + "|".join(cfg.openings or DEFAULT_OPENINGS) + ")", re.I)

    def measure(self, text: str, finish_reason: str | None, tokens: dict | None = None) -> dict:
        """Measured values; `tokens` (n_words, alpha_frac, repetition) may come from spaCy's arrays."""
        if tokens is None:
            words = text.lower().split()
            tokens = {"n_words": len(words), "alpha_frac": round(alpha_fraction(text), 4),
                      "repetition": round(repetition_ratio(words, self.cfg.repetition_n), 4)}
        m = self.opening.match(text)
        if finish_reason == "length":
            truncated = "hit the token limit"
        elif text and not text.endswith(TERMINAL):
            truncated = "ends mid-sentence"
        else:
            truncated = ""
        return {"n_chars": len(text), **tokens,
                "boilerplate": m.group(0) if m and m.group(0).strip() else "", "truncated": truncated}

    def flags(self, v: dict, invalid_utf8: bool) -> list[str]:
        c = self.cfg
        checks = {
            "empty": v["n_words"] == 0 or v["alpha_frac"] == 0,
            "too_few_words": 0 < v["n_words"] < c.min_words,
            "repetition": v["repetition"] > c.max_repetition,
            "truncated": bool(v["truncated"]),
            "too_long": v["n_words"] > c.max_words,
            "non_alpha": v["n_words"] > 0 and v["alpha_frac"] < c.min_alpha,
            "boilerplate": bool(v["boilerplate"]),
            "invalid_utf8": invalid_utf8,
        }
        return [f for f in FLAGS if checks[f]]

    def apply(self, row: dict, text: str, spans: list[tuple[int, int]], finish_reason: str | None,
              tokens: dict | None = None) -> None:
        """Fill a sentences row: measured values, flags, strip actions, kept sentences, exclusion."""
        v = self.measure(text, finish_reason, tokens)
        flags = self.flags(v, bool(row.get("invalid_utf8")))
        spans, stripped = self._strip(text, list(spans), flags, v)
        reasons = [f for f in flags if self.actions[f] == "exclude"]
        if not spans and "empty" not in reasons:
            reasons.append("no sentences left" if flags else "empty")
        row.update(v, flags=flags, stripped=stripped, excluded=bool(reasons), exclude_reasons=reasons,
                   sentences=[text[a:b] for a, b in spans], spans=[[a, b] for a, b in spans], n_sentences=len(spans))

    def _strip(self, text, spans, flags, v):
        stripped = []
        act = {f for f in flags if self.actions[f] == "strip"}
        if "boilerplate" in act and spans:
            a, b = spans[0]
            cut = a + len(v["boilerplate"])
            while cut < b and not text[cut].isalnum():
                cut += 1
            spans[0:1] = [(cut, b)] if cut < b else []
            stripped.append(f"boilerplate: {v['boilerplate'].strip()!r}")
        if "repetition" in act:
            seen, kept = set(), []
            for a, b in spans:
                k = " ".join(text[a:b].lower().split())
                if k not in seen:
                    seen.add(k)
                    kept.append((a, b))
            if len(kept) < len(spans):
                stripped.append(f"repetition: {len(spans) - len(kept)} repeated sentence(s)")
            spans = kept
        if "truncated" in act and len(spans) > 1 and not text[spans[-1][0]:spans[-1][1]].endswith(TERMINAL):
            stripped.append(f"truncated: last sentence {text[spans[-1][0]:spans[-1][1]][:60]!r}")
            spans = spans[:-1]
        if "too_long" in act:
            total, kept = 0, []
            for a, b in spans:
                total += len(text[a:b].split())
                if kept and total > self.cfg.max_words:
                    break
                if total > self.cfg.max_words:  # one sentence alone is too long: cut it at a word boundary
                    ends = [m.end() for m in re.finditer(r"\S+", text[a:b])]
                    b = a + ends[self.cfg.max_words - 1]
                    stripped.append(f"too_long: first sentence cut at {self.cfg.max_words} words")
                kept.append((a, b))
            if len(kept) < len(spans):
                stripped.append(f"too_long: {len(spans) - len(kept)} sentence(s) past {self.cfg.max_words} words")
            spans = kept
        return spans, stripped
