"""VQA accuracy against the official evaluation code, case by case (meter.vqa_accuracy).

Every expected value below was produced by running the OFFICIAL code, not this implementation:
GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py as of 2021 (its current version), run
unmodified under Python 2.7.18 (VQAEval.evaluate on stub vqa / vqaRes objects, one question per case,
answer dicts with answer_id as in the VQA v2 files, the unrounded avgGTAcc recorded via setEvalQA).
A Python 3 port (print statements only) gave the same numbers except the non-ASCII digit case, where
Python 3's Unicode \\d differs from Python 2's [0-9]. Floats are compared exactly.
"""
import pytest

from meter import normalize_answer, vqa_accuracy

OTHERS = ["no", "maybe", "2", "red", "blue", "cat", "dog", "1", "3", "green"]


def k_of_10(k, at_end=False):
    """Ten annotators: k say "yes", the rest give ten-minus-k distinct other answers."""
    hits, rest = ["yes"] * k, OTHERS[: 10 - k]
    return rest + hits if at_end else hits + rest


# (case, prediction, annotator answers, official accuracy)
CASES = [
    ("number word vs digit, annotators agree", "2", ["two"] * 10, 0.0),
    ("number word prediction, annotators disagree", "two", ["2"] * 6 + ["two"] * 4, 1.0),
    ("digit vs 3 number words of 10", "2", ["two"] * 3 + ["3"] * 7, 0.9),
    ("none maps to 0", "none", ["0"] * 4 + ["1"] * 6, 1.0),
    ("ten maps to 10", "ten", ["10"] * 5 + ["11"] * 5, 1.0),
    ("article in prediction, annotators disagree", "a dog", ["dog"] * 5 + ["cat"] * 5, 1.0),
    ("article in prediction, annotators agree", "the dog", ["dog"] * 10, 0.0),
    ("article in annotators, annotators agree", "dog", ["a dog"] * 10, 0.0),
    ("articles, case, number word, period", "The Two Dogs.", ["2 dogs"] * 5 + ["3 dogs"] * 5, 1.0),
    ("exact yes, annotators agree", "yes", ["yes"] * 10, 1.0),
    ("yes. vs all yes", "yes.", ["yes"] * 10, 0.0),
    ("Yes. vs all yes", "Yes.", ["yes"] * 10, 0.0),
    ("Yes vs all yes", "Yes", ["yes"] * 10, 0.0),
    ("Yes. vs 9 yes 1 no", "Yes.", ["yes"] * 9 + ["no"], 1.0),
    ("yes! vs 9 yes 1 no", "yes!", ["yes"] * 9 + ["no"], 1.0),
    ("annotators differ only by case", "YES", ["Yes"] * 5 + ["yes"] * 5, 1.0),
    ("hyphen becomes space", "t-shirt", ["t shirt"] * 5 + ["shirt"] * 5, 1.0),
    ("slash becomes space", "left/right", ["left right"] * 4 + ["left"] * 6, 1.0),
    ("colon is not in the punctuation list", "10:30", ["10:30"] * 5 + ["1030"] * 5, 1.0),
    ("more than 32 periods: only 32 removed", "yes" + "." * 40, ["yes"] * 9 + ["no"], 0.0),
    ("comma in number removed", "1,000", ["1000"] * 5 + ["100"] * 5, 1.0),
    ("comma in number, annotators agree", "1000", ["1,000"] * 10, 0.0),
    ("comma between words becomes space", "red,blue", ["red blue"] * 5 + ["red"] * 5, 1.0),
    ("number comma turns every mark into deletion", "2,000-3,000", ["20003000"] * 5 + ["2000 3000"] * 5, 1.0),
    ("decimal kept", "2.5", ["2.5"] * 5 + ["3"] * 5, 1.0),
    ("0.5 vs .5", "0.5", [".5"] * 5 + ["1"] * 5, 0.0),
    ("trailing period after digit removed", "5.", ["5"] * 4 + ["6"] * 6, 1.0),
    ("non-ASCII digits: comma is not a number comma in py2", "\u0661,\u0662", ["\u0661 \u0662"] * 5 + ["x"] * 5, 1.0),
    ("dont vs don't, annotators disagree", "dont", ["don't"] * 5 + ["no"] * 5, 1.0),
    ("dont vs don't, annotators agree", "dont", ["don't"] * 10, 0.0),
    ("don't vs dont, annotators disagree", "don't", ["dont"] * 5 + ["no"] * 5, 1.0),
    ("one annotator, right", "yes", ["yes"], 0.0),
    ("three annotators agree, right", "yes", ["yes"] * 3, 0.6666666666666666),
    ("three annotators all differ", "yes", ["yes", "no", "maybe"], 0.2222222222222222),
    ("five annotators agree, right", "yes", ["yes"] * 5, 1.0),
    ("five annotators, 3 match", "yes", ["yes"] * 3 + ["no"] * 2, 0.8),
    ("ten agree, right", "blue", ["blue"] * 10, 1.0),
    ("ten agree, wrong", "red", ["blue"] * 10, 0.0),
    ("0 of 10 match", "yes", k_of_10(0), 0.0),
    ("1 of 10 match", "yes", k_of_10(1), 0.3),
    ("2 of 10 match", "yes", k_of_10(2), 0.6),
    ("3 of 10 match", "yes", k_of_10(3), 0.9),
    ("4 of 10 match", "yes", k_of_10(4), 1.0),
    ("1 of 10 match, at the end", "yes", k_of_10(1, at_end=True), 0.3),
    ("2 of 10 match, at the end", "yes", k_of_10(2, at_end=True), 0.5999999999999999),
    ("3 of 10 match, at the end", "yes", k_of_10(3, at_end=True), 0.9),
    ("trailing newline in prediction", "yes\n", ["yes"] * 10, 1.0),
    ("tab inside prediction", "red\tball", ["red ball"] * 10, 1.0),
    ("newline inside prediction, annotators disagree", "red\nball", ["red ball"] * 5 + ["ball"] * 5, 1.0),
    ("trailing spaces in prediction", "yes   ", ["yes"] * 10, 1.0),
    ("trailing space in one annotator: still all agree", "yes", ["yes "] + ["yes"] * 9, 1.0),
    ("double space collapses after normalisation", "red  ball", ["red ball"] * 5 + ["ball"] * 5, 1.0),
]


@pytest.mark.parametrize("name, prediction, answers, expected", CASES, ids=[c[0] for c in CASES])
def test_matches_official_evaluate(name, prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == expected


# processPunctuation + processDigitArticle outputs, from the same Python 2.7 run of the official code
NORMALIZED = [
    ("The Two Dogs.", "2 dogs"), ("1,000", "1000"), ("2,000-3,000", "20003000"), ("red, blue", "red blue"),
    ("red,blue", "red blue"), ("t-shirt", "t shirt"), ("dont", "don't"), ("don't", "don't"), ("0.5", "0.5"),
    (".5", ".5"), ("5.", "5"), ("yes" + "." * 40, "yes" + "." * 8), ("(a) none!", "0"),
    ("an apple; a pear", "apple pear"), ("Im", "im"), ("10:30", "10:30"), ("what's up?", "what's up"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZED)
def test_normalize_answer_matches_official(raw, expected):
    assert normalize_answer(raw) == expected


def test_soft_score_table():
    # leave-one-out over 10 annotators, k of whom gave the prediction: 0, 0.3, 0.6, 0.9, 1.0
    for k, soft in enumerate([0.0, 0.3, 0.6, 0.9, 1.0]):
        assert abs(vqa_accuracy("yes", k_of_10(k)) - soft) < 1e-9
    # with the matches first, the official float sums land exactly on these decimals; with them last,
    # k = 2 comes out one ulp low (see CASES)
    assert [vqa_accuracy("yes", k_of_10(k)) for k in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]
    assert vqa_accuracy("yes", k_of_10(2, at_end=True)) == 0.5999999999999999


def test_empty_answers_raise():
    with pytest.raises(ValueError, match="at least one annotator"):
        vqa_accuracy("yes", [])
