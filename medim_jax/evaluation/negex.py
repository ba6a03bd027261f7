"""NegEx-style scopes over report text: clauses, negation cues and hedges.

A negation cue ("no", "without", "negative for", ...) negates every mention after it in the same
clause, so "no pneumothorax, effusion or consolidation" negates all three; the scope stops at a
sentence end or a contrast word ("but", "however"). A few cues negate what comes just before them
("... is not seen", "... has resolved"). Phrases like "no change in" are not negations. A hedge
("possible", "may represent", ...) makes the mentions after it a possibility.
"""

from __future__ import annotations

import re

# A cue that negates the mentions after it, up to the end of its clause.
NEGATION_BEFORE = re.compile(
    r"\b(?:no|not|without|nor|neither|negative for|free of|absence of|absent|resolved|"
    r"resolution of|rule out|ruled out|clear of)\b")
# A cue that negates the mention just before it ("... is not seen"); a short gap only, so "a nodule
# in the left lung that was not seen before" is not negated by a cue far away.
NEGATION_AFTER = re.compile(
    r"^(?:\s+[\w-]+){0,4}?\s+(?:(?:is|are|was|were|has been|have been)\s+)?"
    r"(?:not (?:seen|identified|present|visualized|visible|demonstrated|appreciated|evident|noted|"
    r"detected)|"
    r"(?:has|have)? ?resolved|absent|no longer \w+|cleared)\b")
# Look like negation cues but are not ("no change in the nodule" still reports a nodule).
NOT_NEGATION = re.compile(
    r"\b(?:no (?:(?:significant|definite|interval|significant interval) )?(?:change|increase|"
    r"growth)|not (?:significantly )?changed|without (?:(?:significant|interval) )?change|"
    r"not (?:be )?excluded|cannot (?:be )?(?:excluded|exclude|ruled out)|not only)\b")
# A cue that makes the mentions after it in its clause a possibility rather than a finding.
HEDGE = re.compile(
    r"\b(?:possible|possibly|may represent|might represent|could represent|could be|may be|"
    r"questionable|versus|vs|differential|to exclude|exclude|concerning for|suspicious for|"
    r"alternatively)\b")
SENTENCE_END = re.compile(r"[.;:!?\n]+(?:\s|$)|\s\d+\.\s")
# Words that end a negation's scope inside a sentence.
SCOPE_END = re.compile(
    r"\b(?:but|however|although|though|except|apart from|aside from|other than|whereas|while|"
    r"which|yet|there (?:is|are)|and (?:the|there|a|an)|"
    r", (?:mild|moderate|severe|stable|persistent|new|increased|patchy|minimal))\b")


def clauses(report: str) -> list[str]:
  """Lower-cased clauses: sentences, cut again where a negation's scope ends."""
  text = NOT_NEGATION.sub(" ", report.lower())
  return [c for sentence in SENTENCE_END.split(text) for c in SCOPE_END.split(sentence)
          if c.strip()]


def negated(clause: str, end: int) -> bool:
  # A cue anywhere before the mention's end: inside it counts too ("heart is not enlarged").
  return (any(m.end() <= end for m in NEGATION_BEFORE.finditer(clause))
          or bool(NEGATION_AFTER.match(clause[end:])))


def hedged(clause: str, start: int) -> bool:
  return any(m.end() <= start for m in HEDGE.finditer(clause))
