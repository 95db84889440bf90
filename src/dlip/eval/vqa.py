"""VQA accuracy as the official VQA evaluation computes it (Antol et al. 2015; Goyal et al.
2017; GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py).

Per question: the predicted answer is normalised (`normalize_answer`: newlines and tabs to
spaces, stripped, punctuation, then lower case, number words to digits, articles dropped,
contractions restored); the ten human answers are compared as they are, except that when they
are not all the same each gets the punctuation step alone (the annotations are already lower
case). Accuracy = mean over the 10 leave-one-out subsets of the human answers of
min(1, matches in the subset / 3): 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

Two details of the official script are kept because they change results: the period regex
`(?!<=\\d)(\\.)(?!\\d)` (its lookbehind is mistyped as a lookahead, so every "." not followed by
a digit is removed) and its `re.UNICODE` passed as `sub`'s *count*, so at most 32 periods are
removed. One is not: the script's per-answer-type numbers average the last leave-one-out
subset's score of each question instead of the question's accuracy; `vqa_accuracy` averages
the accuracies, as the metric is defined (the overall number is the same either way).

Torch-free: it only needs `re`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9",
                "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# The script's punctuation, in its order (the order matters: each is replaced in turn).
PUNCTUATION = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@",
               "`", ",", "?")  # fmt: skip
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD_LIMIT = 32  # the script passes re.UNICODE (32) as sub()'s count

# The script's contraction table, as it is: most values use the typographic apostrophe
# (U+2019), a few the ASCII one, and keys with capitals never match (words are lower-cased
# first). Since "'" is punctuation, "don't" reaches this table as "dont" and leaves as "don’t".
_Q = "\u2019"
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": f"couldn{_Q}t{_Q}ve",
    f"couldnt{_Q}ve": f"couldn{_Q}t{_Q}ve",
    "didnt": f"didn{_Q}t", "doesnt": f"doesn{_Q}t", "dont": f"don{_Q}t", "hadnt": f"hadn{_Q}t",
    f"hadnt{_Q}ve": f"hadn{_Q}t{_Q}ve", "hadn'tve": f"hadn{_Q}t{_Q}ve", "hasnt": f"hasn{_Q}t",
    "havent": f"haven{_Q}t", "hed": f"he{_Q}d", f"hed{_Q}ve": f"he{_Q}d{_Q}ve",
    f"he{_Q}dve": f"he{_Q}d{_Q}ve", "hes": f"he{_Q}s", "howd": f"how{_Q}d", "howll": f"how{_Q}ll",
    "hows": f"how{_Q}s", f"Id{_Q}ve": f"I{_Q}d{_Q}ve", f"I{_Q}dve": f"I{_Q}d{_Q}ve",
    "Im": f"I{_Q}m", "Ive": f"I{_Q}ve", "isnt": f"isn{_Q}t", "itd": f"it{_Q}d",
    f"itd{_Q}ve": f"it{_Q}d{_Q}ve", f"it{_Q}dve": f"it{_Q}d{_Q}ve", "itll": f"it{_Q}ll",
    f"let{_Q}s": f"let{_Q}s", "maam": f"ma{_Q}am", "mightnt": f"mightn{_Q}t",
    f"mightnt{_Q}ve": f"mightn{_Q}t{_Q}ve", f"mightn{_Q}tve": f"mightn{_Q}t{_Q}ve",
    "mightve": f"might{_Q}ve", "mustnt": f"mustn{_Q}t", "mustve": f"must{_Q}ve",
    "neednt": f"needn{_Q}t", "notve": f"not{_Q}ve", "oclock": f"o{_Q}clock",
    "oughtnt": f"oughtn{_Q}t", f"ow{_Q}s{_Q}at": f"{_Q}ow{_Q}s{_Q}at",
    f"{_Q}ows{_Q}at": f"{_Q}ow{_Q}s{_Q}at", f"{_Q}ow{_Q}sat": f"{_Q}ow{_Q}s{_Q}at",
    "shant": f"shan{_Q}t", f"shed{_Q}ve": f"she{_Q}d{_Q}ve", f"she{_Q}dve": f"she{_Q}d{_Q}ve",
    f"she{_Q}s": f"she{_Q}s", "shouldve": f"should{_Q}ve", "shouldnt": f"shouldn{_Q}t",
    f"shouldnt{_Q}ve": f"shouldn{_Q}t{_Q}ve", f"shouldn{_Q}tve": f"shouldn{_Q}t{_Q}ve",
    f"somebody{_Q}d": "somebodyd", f"somebodyd{_Q}ve": f"somebody{_Q}d{_Q}ve",
    f"somebody{_Q}dve": f"somebody{_Q}d{_Q}ve", "somebodyll": f"somebody{_Q}ll",
    "somebodys": f"somebody{_Q}s", "someoned": f"someone{_Q}d",
    f"someoned{_Q}ve": f"someone{_Q}d{_Q}ve", f"someone{_Q}dve": f"someone{_Q}d{_Q}ve",
    "someonell": f"someone{_Q}ll", "someones": f"someone{_Q}s", "somethingd": f"something{_Q}d",
    f"somethingd{_Q}ve": f"something{_Q}d{_Q}ve", f"something{_Q}dve": f"something{_Q}d{_Q}ve",
    "somethingll": f"something{_Q}ll", "thats": f"that{_Q}s", "thered": f"there{_Q}d",
    f"thered{_Q}ve": f"there{_Q}d{_Q}ve", f"there{_Q}dve": f"there{_Q}d{_Q}ve",
    "therere": f"there{_Q}re", "theres": f"there{_Q}s", "theyd": f"they{_Q}d",
    f"theyd{_Q}ve": f"they{_Q}d{_Q}ve", f"they{_Q}dve": f"they{_Q}d{_Q}ve",
    "theyll": f"they{_Q}ll", "theyre": f"they{_Q}re", "theyve": f"they{_Q}ve",
    "twas": f"{_Q}twas", "wasnt": f"wasn{_Q}t", f"wed{_Q}ve": f"we{_Q}d{_Q}ve",
    f"we{_Q}dve": f"we{_Q}d{_Q}ve", "weve": "we've", "werent": f"weren{_Q}t",
    "whatll": f"what{_Q}ll", "whatre": f"what{_Q}re", "whats": f"what{_Q}s",
    "whatve": f"what{_Q}ve", "whens": f"when{_Q}s", "whered": f"where{_Q}d",
    "wheres": "where's", "whereve": f"where{_Q}ve", "whod": f"who{_Q}d",
    f"whod{_Q}ve": f"who{_Q}d{_Q}ve", f"who{_Q}dve": f"who{_Q}d{_Q}ve", "wholl": f"who{_Q}ll",
    "whos": f"who{_Q}s", "whove": "who've", "whyll": f"why{_Q}ll", "whyre": f"why{_Q}re",
    "whys": f"why{_Q}s", "wont": f"won{_Q}t", "wouldve": f"would{_Q}ve",
    "wouldnt": f"wouldn{_Q}t", f"wouldnt{_Q}ve": f"wouldn{_Q}t{_Q}ve",
    f"wouldn{_Q}tve": f"wouldn{_Q}t{_Q}ve", "yall": f"y{_Q}all", f"yall{_Q}ll": f"y{_Q}all{_Q}ll",
    f"y{_Q}allll": f"y{_Q}all{_Q}ll", f"yall{_Q}d{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve",
    f"y{_Q}alld{_Q}ve": f"y{_Q}all{_Q}d{_Q}ve", f"y{_Q}all{_Q}dve": f"y{_Q}all{_Q}d{_Q}ve",
    "youd": f"you{_Q}d", f"youd{_Q}ve": f"you{_Q}d{_Q}ve", f"you{_Q}dve": f"you{_Q}d{_Q}ve",
    "youll": f"you{_Q}ll", "youre": f"you{_Q}re", "youve": f"you{_Q}ve",
}  # fmt: skip


def strip_punctuation(text: str) -> str:
    """The script's `processPunctuation`: each mark is deleted where it touches a space (or
    anywhere, when the text holds a digit,digit comma), else replaced by a space; then periods
    not followed by a digit are deleted (at most 32)."""
    out = text
    joined_number = _DIGIT_COMMA.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or joined_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def digits_and_articles(text: str) -> str:
    """The script's `processDigitArticle`: lower case, number words -> digits, articles
    dropped, contractions restored, words joined by single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return digits_and_articles(strip_punctuation(answer))


def vqa_score(answer: str, gt_answers: list[str]) -> float:
    """The official accuracy (0..1) of one predicted answer against the human answers."""
    if not gt_answers:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    predicted = normalize_answer(answer)
    gts = list(gt_answers)
    if len(set(gts)) > 1:  # the script cleans disagreeing human answers, punctuation only
        gts = [strip_punctuation(g) for g in gts]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(g == predicted for i, g in enumerate(gts) if i != left_out)
        total += min(1.0, matches / 3)
    return total / len(gts)


def _gt_answers(annotation: Mapping[str, Any]) -> list[str]:
    """An annotation's answers: VQAv2's [{"answer": ...}] or a plain list of strings."""
    answers = annotation.get("answers", annotation.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list):
        raise ValueError(f"question {annotation.get('question_id')}: no answers list")
    return [a["answer"] if isinstance(a, Mapping) else a for a in answers]


def vqa_accuracy(
    predictions: Mapping[Any, str], annotations: Iterable[Mapping[str, Any]]
) -> dict[str, Any]:
    """Overall accuracy in % (2 decimals, as the script rounds) and per answer type when the
    annotations give `answer_type`; every annotated question needs a prediction."""
    scores: list[float] = []
    by_type: dict[str, list[float]] = {}
    for annotation in annotations:
        qid = annotation["question_id"]
        if qid not in predictions:
            raise ValueError(f"question {qid} has no predicted answer")
        score = vqa_score(predictions[qid], _gt_answers(annotation))
        scores.append(score)
        if isinstance(annotation.get("answer_type"), str):
            by_type.setdefault(annotation["answer_type"], []).append(score)
    if not scores:
        raise ValueError("no annotated questions to evaluate")
    result: dict[str, Any] = {"overall": _percent(scores), "questions": len(scores)}
    if by_type:
        result["per_answer_type"] = {t: _percent(s) for t, s in sorted(by_type.items())}
        result["questions_per_answer_type"] = {t: len(s) for t, s in sorted(by_type.items())}
    return result


def _percent(scores: list[float]) -> float:
    return round(100 * sum(scores) / len(scores), 2)
