"""Using a VQA model: `Predictor.vqa`, `dlip vqa`, and `POST /api/vqa` on a real `dlip serve`
(answers equal the library's, the same 4xx rules as the other endpoints, routes the model cannot
serve refused with a 400 that says so, concurrent requests answered like single ones)."""

from __future__ import annotations

import json
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import dlip
from dlip.cli import main
from dlip.inference.predictor import Predictor
from dlip.inference.serve import create_app
from test_serve import UPLOAD_LIMIT, ThreadServer, assert_error

PHOTOS = sorted((Path(dlip.__file__).parent / "assets" / "photos").glob("*.jpg"))
ANSWERS = ["yes", "no", "red", "blue", "green", "2", "3", "cat", "coffee", "a dog"]
QUESTIONS = ["what is in the picture?", "is there a cat?", "how many animals are there?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = dlip.create_model(dlip.get_config("test_tiny").vqa_form())
    with torch.no_grad():  # livelier than BERT init, so answers depend on the question
        for name, p in model.named_parameters():
            if name.startswith(("text_encoder", "text_decoder")) and "LayerNorm" not in name:
                p.add_(torch.randn_like(p))
    root = tmp_path_factory.mktemp("vqa_use")
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    return dlip.save(model, root / "model")


@pytest.fixture(scope="module")
def vqa_pred(vqa_dir) -> Predictor:
    return Predictor.load(str(vqa_dir), device="cpu")


# ------------------------------------------------------------------------------- the library
def test_predictor_vqa_zips_and_broadcasts(vqa_pred):
    one = [vqa_pred.vqa(PHOTOS[0], q, ANSWERS)[0] for q in QUESTIONS]
    assert vqa_pred.vqa(PHOTOS[0], QUESTIONS, ANSWERS) == one  # one image, many questions
    assert all(a in ANSWERS for a in one)
    zipped = vqa_pred.vqa(PHOTOS, QUESTIONS[: len(PHOTOS)], ANSWERS, batch_size=2)
    assert zipped == [
        vqa_pred.vqa(p, q, ANSWERS)[0] for p, q in zip(PHOTOS, QUESTIONS, strict=False)
    ]
    generated = vqa_pred.vqa(PHOTOS[0], QUESTIONS)
    assert len(generated) == 3 and all(isinstance(a, str) for a in generated)


def test_predictor_vqa_errors(vqa_pred, pred):
    with pytest.raises(ValueError, match="not a VQA model"):
        pred.vqa(PHOTOS[0], "what is it?")
    with pytest.raises(ValueError, match="3 images vs 2 questions"):
        vqa_pred.vqa(PHOTOS[:3], QUESTIONS[:2])
    with pytest.raises(ValueError, match="non-empty"):
        vqa_pred.vqa(PHOTOS[0], ["   "])
    with pytest.raises(ValueError, match=r"image 0.*not_an_image"):
        vqa_pred.vqa(b"not an image", "what is it?")


def test_cli_vqa(vqa_dir, capsys):
    answers = vqa_dir.parent / "answers.json"
    args = ["vqa", str(PHOTOS[0]), *QUESTIONS, "--model", str(vqa_dir), "--device", "cpu"]
    assert main([*args, "--answers", str(answers), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    pred = Predictor.load(str(vqa_dir), device="cpu")
    want = pred.vqa(PHOTOS[0], QUESTIONS, ANSWERS)
    assert rows == [{"question": q, "answer": a} for q, a in zip(QUESTIONS, want, strict=True)]
    assert main([*args[:3], "--model", str(vqa_dir), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{QUESTIONS[0]}\t{pred.vqa(PHOTOS[0], QUESTIONS[0])[0]}"
    bad = vqa_dir.parent / "bad.json"
    bad.write_text("[1, 2]")
    assert main([*args, "--answers", str(bad)]) == 2
    assert "non-empty strings" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def servers(vqa_dir, model_dir, serve_process, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vqa.log"
    answers = vqa_dir.parent / "answers.json"
    ranked = serve_process(["--model", str(vqa_dir), "--answers", str(answers),
                            "--max-upload-mb", "1"], log)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generated = ThreadServer(create_app(Predictor.load(str(vqa_dir), device="cpu"), None,
                                            UPLOAD_LIMIT))  # fmt: skip
        captioner = ThreadServer(create_app(Predictor.load(str(model_dir), device="cpu"), None,
                                            UPLOAD_LIMIT))  # fmt: skip
    try:
        for server in (ranked, generated, captioner):
            server.wait()
        named = {"ranked": ranked, "generated": generated, "captioner": captioner}
        yield {name: httpx.Client(base_url=s.url, timeout=120) for name, s in named.items()}
    finally:
        for server in (ranked, generated, captioner):
            server.stop()


def ask(client: httpx.Client, image: bytes, question: str | None) -> httpx.Response:
    data = {} if question is None else {"question": question}
    return client.post("/api/vqa", files={"image": ("x.jpg", image, "image/jpeg")}, data=data)


def test_answers_equal_the_library(servers, vqa_pred):
    info = servers["ranked"].get("/api/info").json()
    assert info["tasks"] == ["vqa"] and info["vqa_answers"] == len(ANSWERS)
    assert servers["captioner"].get("/api/info").json()["tasks"] == ["caption", "itm", "search"]
    image = PHOTOS[1].read_bytes()
    for question in QUESTIONS:
        got = ask(servers["ranked"], image, f"  {question} ")
        assert got.status_code == 200
        assert got.json() == {"answer": vqa_pred.vqa(PHOTOS[1], question, ANSWERS)[0]}
        generated = ask(servers["generated"], image, question).json()
        assert generated == {"answer": vqa_pred.vqa(PHOTOS[1], question)[0]}


@pytest.mark.parametrize(
    "case, status, needle",
    [
        ("no_question", 400, "missing field 'question'"),
        ("empty_question", 400, "empty"),
        ("long_question", 400, "longer than"),
        ("not_an_image", 400, "not_an_image"),
        ("no_image", 400, "missing form field 'image'"),
        ("oversize", 413, "too large"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_keeps_answering(servers, case, status, needle):
    client, image = servers["ranked"], PHOTOS[0].read_bytes()
    if case == "no_image":
        response = client.post("/api/vqa", data={"question": "what is it?"})
    else:
        payload = {"not_an_image": b"plain text", "oversize": b"\0" * (UPLOAD_LIMIT + 10)}
        question = {"no_question": None, "empty_question": "  ",
                    "long_question": "why " * 400}.get(case, "what is it?")  # fmt: skip
        response = ask(client, payload.get(case, image), question)
    assert_error(response, status, needle)
    assert ask(client, image, "what is it?").status_code == 200


def test_routes_the_model_cannot_serve_say_so(servers):
    image = PHOTOS[0].read_bytes()
    files = {"image": ("x.jpg", image, "image/jpeg")}
    response = servers["ranked"].post("/api/caption", files=files)
    assert_error(response, 400, "does not do caption (it does: vqa)")
    assert_error(servers["ranked"].get("/api/search", params={"q": "a cat"}), 400, "search")
    assert_error(ask(servers["captioner"], image, "what is it?"), 400, "does not do vqa")


def test_concurrent_questions_answer_like_single_ones(servers, vqa_pred):
    jobs = [(PHOTOS[i % len(PHOTOS)], QUESTIONS[i % 3]) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda j: ask(servers["ranked"], j[0].read_bytes(), j[1]), jobs))
    assert [r.json()["answer"] for r in got] == [vqa_pred.vqa(p, q, ANSWERS)[0] for p, q in jobs]


def test_answers_need_a_vqa_model(model_dir, vqa_dir, capsys):
    args = ["serve", "--model", str(model_dir), "--answers", str(vqa_dir.parent / "answers.json")]
    assert main(args) == 2
    assert "--answers is for a VQA model" in capsys.readouterr().err
