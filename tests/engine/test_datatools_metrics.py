"""Answer metrics against the reference implementations: SQuAD v1.1's official normalization and
exact match, Google's rouge-score for ROUGE-L (Self-Instruct's similarity filter)."""

import re
import string

import pytest

from packtune.datatools.answer_metrics import (
    answer_contained,
    exact_match,
    picked_option,
    rouge_l,
    squad_normalize,
    text_normalize,
)
from packtune.datatools.instruction_filter import SimilarityIndex, heuristic_reason, rejection
from packtune.datatools.scoring import score_predictions


def official_squad_normalize(s):
    """SQuAD v1.1 evaluate-v1.1.py, verbatim."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


# Real instruction-style text (Self-Instruct / Alpaca seed tasks, SQuAD-like answers) and fixed predictions.
PAIRS = [
    ("Give three tips for staying healthy.", "Give three tips for staying healthy and fit."),
    ("What are the three primary colors?", "Name the three primary colours."),
    ("Describe the structure of an atom.", "Explain the structure of the atom in simple words."),
    ("Generate a list of ten items a person might need for a camping trip",
     "Make a list of 10 things one needs when going camping."),
    ("Denver Broncos", "The Denver Broncos!"),
    ("Santa Clara, California", "Levi's Stadium in Santa Clara"),
    ("the 1990s", "1990s."),
    ("Rewrite the following sentence in the third person.", "Rewrite this sentence in third person, please."),
    ("Classify the sentiment of the sentence: I love this!", "classify sentiment"),
    ("Éclair über café — naïve résumé", "eclair uber cafe naive resume"),
    ("", "anything"),
    ("...", "!!!"),
    ("a a a b", "a b a b a"),
    ("Hello-world, it's 2024", "hello world its 2024"),
]


@pytest.mark.parametrize("reference,prediction", PAIRS)
def test_rouge_l_equals_rouge_score(reference, prediction):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(reference, prediction) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("reference,prediction", PAIRS)
def test_exact_match_equals_squad_official(reference, prediction):
    assert squad_normalize(prediction) == official_squad_normalize(prediction)
    expected = official_squad_normalize(prediction) == official_squad_normalize(reference)
    assert exact_match(reference, prediction) is expected


def test_the_similarity_filter_agrees_with_rouge_score_on_real_instructions():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept = [a for a, _ in PAIRS[:4]] + [PAIRS[7][0]]
    index = SimilarityIndex(kept)
    for _, candidate in PAIRS:
        reference = max(scorer.score(k, candidate)["rougeL"].fmeasure for k in kept)
        assert index.max_similarity(candidate) == pytest.approx(reference, abs=1e-12)
        dropped_as_similar = reference >= 0.7 and heuristic_reason(candidate) is None
        assert (rejection(candidate, index) == "similar") == dropped_as_similar


def test_heuristic_filters():
    assert heuristic_reason("Hi there") == "too_short"
    assert heuristic_reason("word " * 151) == "too_long"
    assert heuristic_reason("Describe the Image in one sentence.") == "unactionable_word"
    assert heuristic_reason("Open the file and count its lines.") == "unactionable_word"
    assert heuristic_reason("Profile the user in one sentence.") is None  # "file" inside a word
    assert heuristic_reason("- List three red fruits.") == "starts_with_punctuation"
    assert heuristic_reason("《List three red fruits.") == "starts_with_non_text"
    assert heuristic_reason("List three red fruits.") is None


def test_contained_options_and_text_normalization():
    assert answer_contained("Denver Broncos", "It was the Denver Broncos, who won.")
    assert not answer_contained("Denver", "Denverites")
    assert picked_option(["yes", "no", "it is not possible to tell"], "No.") == "no"
    assert picked_option(["positive", "negative"], "I think it is negative") == "negative"
    assert picked_option(["positive", "negative"], "positive or negative") is None
    assert text_normalize("  A B. ") == "A B" and text_normalize("a") != text_normalize("A")


def test_scores_per_task_and_options():
    rows = [{"task": "nli", "output": "yes", "options": ["yes", "no"]},
            {"task": "nli", "output": "no", "options": ["yes", "no"]},
            {"task": "qa", "output": "the Denver Broncos"}]
    report = score_predictions(rows, ["Yes.", "the answer is no", "Denver Broncos won"])
    result = report.to_dict(with_predictions=True)
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["contains"] == pytest.approx(1.0)
    assert result["option_accuracy"] == 1.0 and result["option_rows"] == 2
    assert result["per_task"]["nli"]["exact_match"] == 0.5 and result["per_task"]["qa"]["exact_match"] == 0.0
    assert result["predictions"][1]["option_picked"] == "no"
    assert report.summary().splitlines()[-1] == "exact match: 33.3%"
    with pytest.raises(ValueError, match="2 predictions for 3 records"):
        score_predictions(rows, ["a", "b"])
