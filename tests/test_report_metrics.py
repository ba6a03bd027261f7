"""Report metrics on pairs small enough to score by hand; the COCO toolkit (two JVMs) runs once."""

import math

import pytest

pytest.importorskip("nltk")
pytest.importorskip("rouge")

from medim_jax.evaluation import report_metrics, wordnet  # noqa: E402


def _wordnet_found() -> bool:
  import nltk
  report_metrics._use_repo_nltk_data()
  try:
    nltk.data.find("corpora/wordnet")
  except LookupError:
    return False
  return True


needs_wordnet = pytest.mark.skipif(not _wordnet_found(),
                                   reason="no WordNet (python -m medim_jax.evaluation.wordnet)")
needs_coco = pytest.mark.skipif(report_metrics.coco_toolkit_problem() is not None,
                                reason=str(report_metrics.coco_toolkit_problem()))


def identical_meteor(words: int) -> float:
  # nltk METEOR of a hypothesis equal to its reference: fmean 1, one chunk, penalty 0.5 (1/m)^3.
  return 1.0 - 0.5 / words ** 3


def test_paper_tokens_detach_periods_and_drop_empties():
  assert report_metrics.paper_tokens(" Heart size normal.  No  effusion.") == [
      "heart", "size", "normal", ".", "no", "effusion", "."]


def test_paper_protocol_hand_computed_pair():
  # ref: the heart is normal in size (6 words), hyp: the heart size is normal (5 words).
  scores = report_metrics.paper_protocol(["The heart is normal in size"], ["the heart size is normal"])
  brevity = math.exp(1 - 6 / 5)
  # n-gram precisions: 5/5, 2/4 (the heart, is normal), then no matches: method1 uses 0.1 / count.
  precisions = [1.0, 2 / 4, 0.1 / 3, 0.1 / 2]
  for n in (1, 2, 3, 4):
    expected = brevity * math.prod(precisions[:n]) ** (1 / n)
    assert scores[f"bleu{n}"] == pytest.approx(expected, rel=1e-9)
  assert scores["rouge1"] == pytest.approx(10 / 11, abs=1e-7)  # P 5/5, R 5/6
  assert scores["rouge2"] == pytest.approx(4 / 9, abs=1e-7)  # P 2/4, R 2/5
  assert scores["rougeL"] == pytest.approx(8 / 11, abs=1e-7)  # LCS "the heart is normal": 4
  assert scores["num_pairs"] == 1


@needs_wordnet
def test_paper_meteor_identical_and_wordnet_synonym():
  scores = report_metrics.paper_protocol(["the lungs appear clear", "small dense spot at the apex"],
                                         ["the lungs seem clear", "small dense spot at the apex"])
  # "seem" matches "appear" only through WordNet; then both pairs are one in-order chunk.
  assert scores["meteor"] == pytest.approx((identical_meteor(4) + identical_meteor(6)) / 2)


def test_empty_hypotheses_score_zero_or_are_skipped_like_the_original():
  references = ["both lungs look clear", "no fluid seen", "bones intact"]
  hypotheses = ["both lungs look clear", "  ", "..."]
  kept = report_metrics.paper_protocol(references, hypotheses)
  assert kept["num_pairs"] == 3
  assert kept["rougeL"] == pytest.approx(1 / 3)
  assert kept["bleu1"] == pytest.approx(1 / 3)  # "..." are three periods, none in "bones intact"
  skipped = report_metrics.paper_protocol(references, hypotheses, skip_unscorable=True)
  assert skipped["num_pairs"] == 1
  assert skipped["rougeL"] == pytest.approx(1.0, abs=1e-7)
  assert skipped["bleu4"] == pytest.approx(1.0)


def test_empty_reference_is_an_error_unless_skipping():
  with pytest.raises(ValueError, match="reference 1"):
    report_metrics.paper_protocol(["a b", ""], ["a b", "c d"])
  assert report_metrics.paper_protocol(["a b", ""], ["a b", "c d"], skip_unscorable=True)["num_pairs"] == 1


def test_missing_java_and_wordnet_are_unavailable_not_zero(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
  monkeypatch.setattr(report_metrics, "_wordnet_problem", lambda: "WordNet not found")
  metrics = report_metrics.evaluate_reports(["heart normal"], ["heart normal"])
  for name in report_metrics.COCO_METRICS:
    assert "java not found" in metrics["coco_toolkit"][name]["unavailable"]
  assert metrics["paper_protocol"]["meteor"] == {"unavailable": "WordNet not found"}
  assert metrics["paper_protocol"]["bleu1"] == pytest.approx(1.0)
  assert "unavailable (java not found" in report_metrics.describe(metrics)


def test_no_pairs_are_unavailable():
  metrics = report_metrics.evaluate_reports([], [])
  for protocol in ("paper_protocol", "coco_toolkit"):
    assert metrics[protocol]["bleu1" if protocol == "paper_protocol" else "Bleu_1"] == {
        "unavailable": "no pairs to score"}
  with pytest.raises(ValueError):
    report_metrics.evaluate_reports(["a"], [])


@needs_coco
def test_coco_toolkit_closed_forms_with_an_empty_hypothesis():
  # Two exact hypotheses (4 and 7 words after PTB tokenization, no shared words) and an empty one
  # (its reference: 4 words).
  references = ["Left lung looks clear.", "A small round shadow near its base.", "No change since before"]
  hypotheses = ["left lung looks clear.", "A small round shadow near its base .", ""]
  metrics = report_metrics.evaluate_reports(references, hypotheses)
  coco = metrics["coco_toolkit"]
  assert coco["num_pairs"] == 3
  # Every hypothesis n-gram matches, so each corpus BLEU is its brevity penalty: exp(1 - 15/11).
  for n in (1, 2, 3, 4):
    assert coco[f"Bleu_{n}"] == pytest.approx(math.exp(1 - 15 / 11), rel=1e-6)
  assert coco["ROUGE_L"] == pytest.approx(2 / 3)
  assert coco["CIDEr"] == pytest.approx(20 / 3)  # 10 per exact pair (cosine 1, no length penalty)
  assert 0.5 < coco["METEOR"] < 1.0  # the jar's corpus METEOR: no closed form, but it ran
  paper = metrics["paper_protocol"]
  assert paper["num_pairs"] == 3
  assert paper["rougeL"] == pytest.approx(2 / 3, abs=1e-7)
  if _wordnet_found():
    # Paper tokens keep the period: 5 and 8 tokens matched in one chunk each.
    assert paper["meteor"] == pytest.approx((identical_meteor(5) + identical_meteor(8)) / 3)


def test_lexnames_is_wordnet_30_table():
  lines = wordnet.lexnames_text().splitlines()
  assert len(lines) == 45
  assert lines[0] == "00\tadj.all\t3" and lines[3] == "03\tnoun.Tops\t1"
  assert lines[29] == "29\tverb.body\t2" and lines[44] == "44\tadj.ppl\t3"
  categories = [line.split("\t")[2] for line in lines]
  assert [categories.count(c) for c in "1234"] == [26, 15, 3, 1]


@pytest.mark.skipif(not wordnet.is_installed(), reason="WordNet not installed in the repo cache")
def test_wordnet_install_is_idempotent():
  lexnames = wordnet.wordnet_dir(wordnet.DEFAULT_NLTK_DATA) / "lexnames"
  before = lexnames.stat().st_mtime_ns
  assert wordnet.install(verbose=False) == lexnames.parent
  assert lexnames.stat().st_mtime_ns == before


@needs_coco
def test_a_failing_meteor_jar_is_unavailable(monkeypatch):
  from pycocoevalcap.meteor import meteor
  monkeypatch.setattr(meteor, "METEOR_JAR", "missing.jar")  # the JVM exits at once
  with report_metrics._meteor_jar() as scorer:
    score = report_metrics._meteor_score(scorer, {0: ["a b c"]}, {0: ["a b"]})
  assert "METEOR jar failed" in score["unavailable"] and "missing.jar" in score["unavailable"]
