"""Report-generation metrics under two protocols, each number labelled with the protocol it came from.

- ``paper_protocol``: what MeDiM's ``report_metric.py`` computes. Per pair: lowercase, ``"." -> " ."``,
  split on single spaces, drop empty tokens; nltk ``sentence_bleu`` with cumulative weights 1..4 and
  ``SmoothingFunction().method1``; nltk ``single_meteor_score`` (WordNet, see ``wordnet.py``); ROUGE-1/2/L
  F from the ``rouge`` package (1.0.1) on the lowercased raw strings. Every score is averaged over pairs
  (sentence-level averages, not corpus BLEU).
- ``coco_toolkit``: ``pycocoevalcap`` 1.2 as most report-generation papers run it: the Stanford
  PTBTokenizer (lowercase, punctuation dropped), corpus BLEU-1..4, METEOR 1.5 (the jar), ROUGE-L
  (beta 1.2) and CIDEr (the toolkit's CIDEr-D; its IDF comes from the references being scored, so it
  depends on the whole set). SPICE is left out (it downloads Stanford models).

The two disagree on the same pairs (nltk's METEOR is far higher than the jar's), so never mix them.

Pairs the original script cannot score: it skips a pair whose hypothesis is empty or makes ``rouge``
raise (no words outside periods), which raises its averages. By default these pairs stay in and score
what they are worth, 0 (nltk's BLEU and METEOR already give 0; ROUGE is 0 by definition with no words);
``skip_unscorable=True`` reproduces the original's skipping.

A metric that cannot run (no java, no WordNet, a package missing, no pairs) is reported as
``{"unavailable": reason}``, never as 0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from typing import Any, Iterator

from medim_jax.evaluation import wordnet

BLEU_WEIGHTS = {f"bleu{n}": (1.0 / n,) * n for n in (1, 2, 3, 4)}
PAPER_METRICS = (*BLEU_WEIGHTS, "meteor", "rouge1", "rouge2", "rougeL")
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
INSTALL_HINT = "pip install -e '.[eval]'"

Metric = float | dict[str, str]


def unavailable(reason: str) -> dict[str, str]:
  return {"unavailable": reason}


def _missing(*modules: str) -> str | None:
  absent = [m for m in modules if importlib.util.find_spec(m) is None]
  return f"{', '.join(absent)} not installed ({INSTALL_HINT})" if absent else None


def _use_repo_nltk_data():
  """Puts the repository's nltk data (where ``wordnet.py`` installs WordNet) first on nltk's path."""
  import nltk
  path = str(wordnet.DEFAULT_NLTK_DATA)
  if path not in nltk.data.path:
    nltk.data.path.insert(0, path)


def _wordnet_problem() -> str | None:
  _use_repo_nltk_data()
  from nltk.corpus import wordnet as wn
  try:
    wn.ensure_loaded()
  except LookupError:
    return (f"WordNet not found for nltk (run `python -m medim_jax.evaluation.wordnet` to install it "
            f"into {wordnet.DEFAULT_NLTK_DATA})")
  return None


# ----------------------------------------------------------------------------------------------------
# Paper protocol (MeDiM's report_metric.py)
# ----------------------------------------------------------------------------------------------------


def paper_tokens(text: str) -> list[str]:
  """MeDiM's ``prep_reports``: lowercase, detach periods, split on single spaces, drop empties."""
  return [token for token in text.lower().replace(".", " .").split(" ") if token]


def _rouge_fs(rouge_scorer, hypothesis: str, reference: str) -> dict[str, float]:
  scores = rouge_scorer.get_scores(hypothesis.lower(), reference.lower())[0]
  return {"rouge1": scores["rouge-1"]["f"], "rouge2": scores["rouge-2"]["f"],
          "rougeL": scores["rouge-l"]["f"]}


def _has_rouge_words(text: str) -> bool:
  # rouge splits on "." and raises when no sentence is left.
  return any(part for part in text.split("."))


def paper_protocol(references: list[str], hypotheses: list[str],
                   skip_unscorable: bool = False) -> dict[str, Any]:
  """Means over pairs of MeDiM's per-pair scores; ``num_pairs`` says how many pairs were averaged."""
  problem = _missing("nltk")
  if problem:
    return {**{name: unavailable(problem) for name in PAPER_METRICS}, "num_pairs": 0}
  from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
  from nltk.translate.meteor_score import single_meteor_score

  rouge_problem = _missing("rouge")
  meteor_problem = _wordnet_problem() if references else None  # loading WordNet takes seconds
  rouge_scorer = None
  if rouge_problem is None:
    from rouge import Rouge
    rouge_scorer = Rouge()
  smoothing = SmoothingFunction().method1

  totals = {name: 0.0 for name in PAPER_METRICS}
  num_pairs = 0
  for i, (reference, hypothesis) in enumerate(zip(references, hypotheses, strict=True)):
    reference, hypothesis = reference.strip(), hypothesis.strip()
    if skip_unscorable and not hypothesis:
      continue
    if not _has_rouge_words(reference) and not skip_unscorable:
      raise ValueError(f"reference {i} ({reference!r}) has no words to score against")
    scores = {}
    if rouge_scorer is not None:
      try:
        scores = _rouge_fs(rouge_scorer, hypothesis, reference)
      except Exception:  # pylint: disable=broad-except
        if skip_unscorable:
          continue  # as the original: a pair that rouge cannot score is dropped
        if _has_rouge_words(hypothesis):
          raise
        scores = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}  # a hypothesis without words
    reference_tokens, hypothesis_tokens = paper_tokens(reference), paper_tokens(hypothesis)
    for name, weights in BLEU_WEIGHTS.items():
      scores[name] = sentence_bleu([reference_tokens], hypothesis_tokens, weights=weights,
                                   smoothing_function=smoothing)
    if meteor_problem is None:
      scores["meteor"] = single_meteor_score(reference_tokens, hypothesis_tokens)
    for name, value in scores.items():
      totals[name] += value
    num_pairs += 1

  result: dict[str, Any] = {}
  for name in PAPER_METRICS:
    if name == "meteor" and meteor_problem:
      result[name] = unavailable(meteor_problem)
    elif name.startswith("rouge") and rouge_problem:
      result[name] = unavailable(rouge_problem)
    elif num_pairs == 0:
      result[name] = unavailable("no pairs to score")
    else:
      result[name] = totals[name] / num_pairs
  result["num_pairs"] = num_pairs
  return result


# ----------------------------------------------------------------------------------------------------
# COCO caption toolkit (pycocoevalcap 1.2)
# ----------------------------------------------------------------------------------------------------


def coco_toolkit_problem() -> str | None:
  """Why the COCO toolkit cannot run here (None when it can)."""
  problem = _missing("pycocoevalcap")
  if problem:
    return problem
  if shutil.which("java") is None:
    return "java not found (the toolkit's PTBTokenizer and METEOR 1.5 jar need it)"
  return None


@contextlib.contextmanager
def _meteor_jar() -> Iterator[Any]:
  """The toolkit's METEOR 1.5 JVM, started now (its ~7 s start overlaps the other metrics) and always
  stopped on exit. Yields the ``Meteor`` scorer, or the reason it could not start."""
  from pycocoevalcap.meteor.meteor import Meteor
  try:
    meteor = Meteor()
  except OSError as e:
    yield f"METEOR jar did not start: {e}"
    return
  try:
    yield meteor
  finally:
    if meteor.lock.locked():  # left held by a failed compute_score; Meteor.__del__ would wait forever
      meteor.lock.release()
    with contextlib.suppress(OSError):  # a dead JVM's pipe; closed here so __del__ has nothing to flush
      meteor.meteor_p.stdin.close()
    meteor.meteor_p.kill()
    meteor.meteor_p.wait()


def _meteor_score(meteor, gts, res) -> Metric:
  if isinstance(meteor, str):
    return unavailable(meteor)
  try:
    return float(meteor.compute_score(gts, res)[0])
  except (OSError, ValueError) as e:  # the JVM died (broken pipe) or answered nothing
    meteor.meteor_p.kill()
    detail = meteor.meteor_p.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
    return unavailable(f"METEOR jar failed: {e!r} {' '.join(detail)}".strip())


def coco_tokenize(references: list[str], hypotheses: list[str]):
  """Both sides through one PTBTokenizer JVM; returns (gts, res) as the scorers expect them."""
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  captions = {}
  for i, (reference, hypothesis) in enumerate(zip(references, hypotheses, strict=True)):
    # One caption per line for the tokenizer: fold every kind of line break into a space.
    captions["ref", i] = [{"caption": " ".join(reference.split())}]
    captions["hyp", i] = [{"caption": " ".join(hypothesis.split())}]
  tokens = PTBTokenizer().tokenize(captions)
  if tokens.keys() != captions.keys():
    raise RuntimeError(f"PTBTokenizer returned {len(tokens)} of {len(captions)} captions")
  gts = {i: tokens["ref", i] for i in range(len(references))}
  res = {i: tokens["hyp", i] for i in range(len(hypotheses))}
  return gts, res


def coco_toolkit(references: list[str], hypotheses: list[str], meteor=None) -> dict[str, Any]:
  """Corpus-level COCO caption metrics. ``meteor``: a started scorer from ``_meteor_jar`` (or the
  reason it is missing); when None, one is started here."""
  problem = coco_toolkit_problem() if references else "no pairs to score"
  if problem:
    return {**{name: unavailable(problem) for name in COCO_METRICS}, "num_pairs": 0}
  if meteor is None:
    with _meteor_jar() as started:
      return coco_toolkit(references, hypotheses, started)
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge

  try:
    gts, res = coco_tokenize(references, hypotheses)
  except Exception as e:  # pylint: disable=broad-except
    reason = f"PTBTokenizer failed: {e!r}"
    return {**{name: unavailable(reason) for name in COCO_METRICS}, "num_pairs": 0}
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  result: dict[str, Any] = {f"Bleu_{n}": float(bleu[n - 1]) for n in (1, 2, 3, 4)}
  result["METEOR"] = _meteor_score(meteor, gts, res)
  result["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
  result["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  result["num_pairs"] = len(references)
  return result


# ----------------------------------------------------------------------------------------------------


def evaluate_reports(references: list[str], hypotheses: list[str], skip_unscorable: bool = False,
                     coco: bool = True) -> dict[str, Any]:
  """{"paper_protocol": {...}, "coco_toolkit": {...}}: each metric a float or {"unavailable": reason};
  ``num_pairs`` in each says how many pairs its means cover. ``coco=False`` skips the JVMs."""
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  references, hypotheses = list(references), list(hypotheses)
  if not coco:
    coco_problem = "not requested (coco=False)"
  elif not references:
    coco_problem = "no pairs to score"
  else:
    coco_problem = coco_toolkit_problem()
  if coco_problem:
    return {"paper_protocol": paper_protocol(references, hypotheses, skip_unscorable),
            "coco_toolkit": {**{name: unavailable(coco_problem) for name in COCO_METRICS},
                             "num_pairs": 0}}
  with _meteor_jar() as meteor:  # the JVM loads while nltk scores
    paper = paper_protocol(references, hypotheses, skip_unscorable)
    return {"paper_protocol": paper, "coco_toolkit": coco_toolkit(references, hypotheses, meteor)}


def describe(metrics: dict[str, Any]) -> str:
  """One line per protocol, e.g. ``paper_protocol: bleu1 0.4123 ... meteor unavailable (...)``."""
  lines = []
  for protocol, scores in metrics.items():
    parts = []
    for name, value in scores.items():
      if isinstance(value, dict):
        parts.append(f"{name} unavailable ({value['unavailable']})")
      elif isinstance(value, float):
        parts.append(f"{name} {value:.4f}")
      else:
        parts.append(f"{name} {value}")
    lines.append(f"{protocol}: " + ", ".join(parts))
  return "\n".join(lines)
