"""dlip.eval.vqa against hand-computed cases of the official VQA accuracy."""

from __future__ import annotations

import pytest

from dlip.eval.vqa import normalize_answer, strip_punctuation, vqa_accuracy, vqa_score


@pytest.mark.parametrize(
    "matches, expected",
    [
        # 10 human answers, k of them equal to the prediction. Leaving out one of the k leaves
        # k-1 matches, leaving out another answer leaves k: acc = (k*min(1,(k-1)/3) +
        # (10-k)*min(1,k/3)) / 10.
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = (2/3 + 16/3) / 10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(matches, expected):
    gts = ["cat"] * matches + ["dog"] * (10 - matches)
    if matches == 0:
        gts = ["dog"] * 10
    assert vqa_score("cat", gts) == pytest.approx(expected)


def test_the_prediction_is_normalised_as_the_official_script_does():
    gts = ["2"] * 10  # all equal: the human answers are compared as they are
    assert vqa_score("Two", gts) == 1.0  # lower case, number word -> digit
    assert vqa_score("two.", gts) == 1.0  # a period before no digit is deleted
    assert vqa_score("the 2", gts) == 1.0  # articles dropped
    assert vqa_score(" 2\n", gts) == 1.0
    assert normalize_answer("2.5") == "2.5"  # a period before a digit stays
    assert normalize_answer("yes!") == "yes!"  # "!" is not in the script's list
    assert normalize_answer("red, white") == "red white"  # ", " touches a space: deleted
    assert normalize_answer("1,000") == "1000"  # a digit,digit comma: every mark deleted
    assert normalize_answer("left/right") == "left right"  # replaced by a space
    # "'" is punctuation, so "dont" is restored with the script's typographic apostrophe
    assert normalize_answer("dont") == "don\u2019t" and normalize_answer("don't") == "don t"
    assert normalize_answer("An apple") == "apple"


def test_disagreeing_human_answers_get_the_punctuation_step_only():
    # Not all equal -> each human answer loses its punctuation ("yes." -> "yes") but is not
    # lower-cased: "Yes" stays "Yes" and matches nothing.
    gts = ["yes."] * 3 + ["Yes"] * 3 + ["no"] * 4
    assert [strip_punctuation(g) for g in gts[:4]] == ["yes", "yes", "yes", "Yes"]
    assert vqa_score("yes", gts) == pytest.approx(0.9)  # 3 matches
    # All equal -> left as they are: "yes." never equals a normalised prediction.
    assert vqa_score("yes", ["yes."] * 10) == 0.0


def test_accuracy_overall_and_per_answer_type():
    annotations = [
        {"question_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "answer_type": "number", "answers": ["2"] * 9 + ["3"]},
        {"question_id": 3, "answer_type": "other", "answers": ["red"] * 2 + ["blue"] * 8},
    ]
    predictions = {1: "yes", 2: "3", 3: "red"}
    # Scores: 1.0; "3" matches once -> 0.3; "red" matches twice -> 0.6. Mean 1.9/3 = 63.33%.
    result = vqa_accuracy(predictions, annotations)
    assert result["overall"] == 63.33 and result["questions"] == 3
    assert result["per_answer_type"] == {"number": 30.0, "other": 60.0, "yes/no": 100.0}
    with pytest.raises(ValueError, match="question 3 has no predicted answer"):
        vqa_accuracy({1: "yes", 2: "2"}, annotations)
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("yes", [])
