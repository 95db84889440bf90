"""VQA annotations -> one jsonl form (`dlip data build vqa`), and BLIP's answer weights.

Two inputs are read:

- **BLIP's JSON files** (salesforce/BLIP data/vqa_dataset.py): `vqa_train.json`,
  `vqa_val.json`, `vg_qa.json`, `vqa_test.json`, lists of `{"question_id", "question",
  "answer": [...], "image", "dataset": "vqa" | "vg"}`; `image` is relative to the COCO root
  (`dataset` "vqa") or the Visual Genome root ("vg"); test rows have no `answer`.
- **The official VQAv2 files** (visualqa.org, Goyal et al. 2017): `v2_OpenEnded_mscoco_<subtype>
  _questions.json` (`{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}`)
  and, except for test, `v2_mscoco_<subtype>_annotations.json` (`{"annotations":
  [{"question_id", "answers": [{"answer", ...}] x 10, "answer_type", ...}]}`); images are
  `<subtype>/COCO_<subtype>_<image_id:012d>.jpg` under the COCO root.

Each kept question is one row `{"question_id", "question", "image" (absolute), "answers": [...],
"source": "vqa" | "vg"}` plus `"answer_type"` when known. Bad rows are counted by reason, the
rest written: `malformed_row` (no question id, a bad image id), `empty_question`, `no_answer`
(a training or validation row without answers), `outside_root` (an image name leading out of
its root), `missing_file` (with `check_files`). Training weights follow BLIP: a VQAv2
answer weighs its share of the annotations, each Visual Genome answer 0.2 (`answer_weights`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlip.data.common import BadSample, under_root
from dlip.data.karpathy import iter_json_array

if TYPE_CHECKING:
    from dlip.data.rows import BuildReport

VG_ANSWER_WEIGHT = 0.2  # BLIP's weight of a Visual Genome QA answer (data/vqa_dataset.py)
VQA_KEYS = ("question_id", "question", "image", "answers", "source")


def answer_weights(row: dict[str, Any]) -> tuple[list[str], list[float]]:
    """(distinct answers, weights) as BLIP trains on them: for VQAv2 an answer's share of the
    row's annotations (3 of 10 -> 0.3); for Visual Genome 0.2 per answer."""
    if row["source"] == "vg":
        return list(row["answers"]), [VG_ANSWER_WEIGHT] * len(row["answers"])
    counts = Counter(row["answers"])  # insertion-ordered: first appearance first, as BLIP
    return list(counts), [n / len(row["answers"]) for n in counts.values()]


def _question(entry: Any) -> str:
    question = entry.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadSample("empty_question", repr(question)[:80])
    return question.strip()


def _answers(value: Any) -> list[str]:
    """A list of answer strings from BLIP's `answer` (str or list) or VQAv2's answer dicts."""
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        text = item.get("answer") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            out.append(text.strip())
    return out


def _question_id(entry: Any) -> int | str:
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise BadSample("malformed_row", f"no question_id in {str(entry)[:80]}")
    return qid


def _image(root: str | Path, name: Any, check_files: bool) -> str:
    if not isinstance(name, str) or not name:
        raise BadSample("malformed_row", f"image {name!r}")
    path = under_root(root, name)
    if check_files and not os.path.isfile(path):
        raise BadSample("missing_file", path)
    return path


def _blip_row(
    entry: Any, roots: dict[str, str | Path | None], check_files: bool, need_answers: bool
) -> dict[str, Any]:
    qid = _question_id(entry)
    source = entry.get("dataset", "vqa")
    root = roots.get(source)
    if root is None:
        raise BadSample("malformed_row", f"question {qid}: dataset {source!r} has no image root")
    row = {"question_id": qid, "question": _question(entry)}
    row["image"] = _image(root, entry.get("image"), check_files)
    row["answers"] = _answers(entry.get("answer", []))
    if need_answers and not row["answers"]:
        raise BadSample("no_answer", f"question {qid}")
    row["source"] = source
    if isinstance(entry.get("answer_type"), str):  # e.g. `dlip data synth`'s questions
        row["answer_type"] = entry["answer_type"]
    return row


def build_vqa_blip(
    paths: Iterable[str | Path],
    *,
    report: BuildReport,
    vqa_root: str | Path | None,
    vg_root: str | Path | None = None,
    check_files: bool = True,
) -> Iterator[dict[str, Any]]:
    """Rows of BLIP's VQA JSON files (see the module docstring); a file whose rows have no
    answers at all is a test split and keeps them, elsewhere a row without answers is
    `no_answer`."""
    roots = {"vqa": vqa_root, "vg": vg_root}
    for path in paths:
        need_answers = "test" not in Path(path).stem
        for entry in iter_json_array(path):
            try:  # (iter_json_array: an item that is not an object is an error naming the file)
                yield _blip_row(entry, roots, check_files, need_answers)
            except BadSample as bad:
                report.skipped.add(bad.reason)


def _load_object(path: str | Path, key: str) -> dict[str, Any]:
    """A VQAv2 file's top-level object, which must hold a `key` list."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path}: expected an object with a {key!r} list (the VQAv2 format)")
    return data


def build_vqa_official(
    questions: str | Path,
    annotations: str | Path | None,
    *,
    report: BuildReport,
    image_root: str | Path,
    check_files: bool = True,
) -> Iterator[dict[str, Any]]:
    """Rows of the official VQAv2 question (+ annotation) files; without annotations (test)
    every row has no answers."""
    data = _load_object(questions, "questions")
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise ValueError(f"{questions}: no 'data_subtype' (e.g. train2014): cannot name images")
    answers = _annotation_index(annotations) if annotations is not None else None
    for entry in data["questions"]:
        try:
            yield _official_row(entry, answers, subtype, image_root, check_files)
        except BadSample as bad:
            report.skipped.add(bad.reason)


def _annotation_index(path: str | Path) -> dict[Any, dict[str, Any]]:
    """question_id -> annotation; an annotation without a question_id is left out."""
    items = _load_object(path, "annotations")["annotations"]
    return {a["question_id"]: a for a in items if isinstance(a, dict) and "question_id" in a}


def _official_row(
    entry: Any,
    answers: dict[Any, dict[str, Any]] | None,
    subtype: str,
    image_root: str | Path,
    check_files: bool,
) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise BadSample("malformed_row", f"a JSON {type(entry).__name__}")
    qid = _question_id(entry)
    image_id = entry.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        raise BadSample("malformed_row", f"question {qid}: image_id {image_id!r}")
    name = f"{subtype}/COCO_{subtype}_{image_id:012d}.jpg"
    row = {"question_id": qid, "question": _question(entry)}
    row["image"] = _image(image_root, name, check_files)
    row["answers"], row["source"] = [], "vqa"
    if answers is not None:
        annotation = answers.get(qid)
        row["answers"] = _answers(annotation.get("answers", [])) if annotation else []
        if not row["answers"]:
            raise BadSample("no_answer", f"question {qid}")
        if isinstance(annotation.get("answer_type"), str):
            row["answer_type"] = annotation["answer_type"]
    return row


def write_vqa(rows: Iterable[dict[str, Any]], path: str | Path, report: BuildReport) -> int:
    """Write VQA rows as jsonl atomically, counting kept rows per source."""
    from dlip.data.common import atomic_text

    n = 0
    with atomic_text(path) as f:
        for row in report.track(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_vqa(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a VQA jsonl (`write_vqa`); a malformed line is an error naming file and line."""
    rows = []
    with Path(path).open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
            missing = [k for k in VQA_KEYS if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}:{n}: a VQA row lacks {missing}")
            rows.append(row)
    return rows
