"""The KD core, end to end through the real pretraining task: an identical teacher gives every KD
term zero, and a teacher without a trained ITC temperature (converted from transformers) cannot
silently set kd_itc's sharpness."""

from __future__ import annotations

import pytest
import torch

import dlip
from dlip.data.synthetic import synthesize
from dlip.losses.adapters import KD_TERMS
from dlip.tokenizer import get_tokenizer
from dlip.train.config import load
from dlip.train.loop import to_inputs
from dlip.train.pretrain import build_loader, build_task
from dlip.train.task import load_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_kd")
    synthesize(out, 12, seed=0, image_size=32, captions_per_image=2)
    return out


def _cfg(synth, tmp_path, teacher, **extra):
    items = {
        "run_dir": tmp_path / "run", "max_steps": 1, "data.synth_dir": synth,
        "data.batch_size": 4, "data.num_workers": 0, "data.max_length": 20,
        "data.hflip": "false", "data.rand_augment": "false", "loss.momentum_distill": "false",
        "teacher.checkpoint": teacher, "model.preset": "test_tiny", **extra,
    }  # fmt: skip
    return load(None, [f"{k}={v}" for k, v in items.items()])


def _batch(cfg, task):
    loader = build_loader(cfg, task.student.config)
    loader.set_epoch(0)
    return to_inputs(next(iter(loader)), get_tokenizer(), cfg.data.max_length, "cpu")


@torch.no_grad()
def test_an_identical_teacher_gives_every_kd_term_zero(synth, tmp_path):
    """The student copies the teacher exactly (model.init=inherit, same architecture): every
    KD term that is a distance (all but kd_icl), through the real task forward (image, text,
    fusion with the student's ITM pairs, decoder), is ~0. A term reading the wrong layer,
    tokens, pairs or mask would not be. kd_icl (CLIP-KD's contrastive term) is a cross-entropy:
    against identical keys it equals the student's own in-batch ITC loss."""
    torch.manual_seed(3)
    teacher_dir = dlip.save(dlip.create_model("test_tiny"), tmp_path / "teacher")
    weights = {f"loss.kd.weights.{t}": 1.0 for t in KD_TERMS}
    cfg = _cfg(synth, tmp_path, teacher_dir, **{"model.init": "inherit", **weights})
    task = build_task(cfg, load_teacher(cfg)).eval()  # eval: dropout off on both sides
    s, t = task.student.state_dict(), task.teacher.state_dict()
    assert all(torch.equal(s[k], t[k]) for k in s)
    terms = task(_batch(cfg, task))
    kd = {k: float(v) for k, v in terms.items() if k.startswith("kd_")}
    assert set(kd) == set(KD_TERMS)
    assert kd.pop("kd_icl") == pytest.approx(float(terms["loss_itc"]), rel=1e-5)
    assert all(abs(v) < 1e-6 for v in kd.values()), kd
    assert all(float(terms[k]) > 0 for k in ("loss_itc", "loss_itm", "loss_lm"))


def test_a_teacher_without_a_trained_temperature_needs_itc_temperature(synth, tmp_path):
    model = dlip.create_model("test_tiny")
    model.config = model.config.replace(temp_known=False)  # what `dlip convert --from hf` gives
    teacher_dir = dlip.save(model, tmp_path / "hf_teacher")
    assert not dlip.load(teacher_dir).config.temp_known  # saved and read back
    cfg = _cfg(synth, tmp_path, teacher_dir, **{"loss.kd.weights.kd_itc": 1.0})
    with pytest.raises(ValueError, match=r"no trained ITC temperature.*loss\.kd\.itc_temperature"):
        build_task(cfg, load_teacher(cfg))
    fixed = _cfg(synth, tmp_path, teacher_dir, **{"loss.kd.weights.kd_itc": 1.0,
                                                  "loss.kd.itc_temperature": 0.05})  # fmt: skip
    assert "kd_itc" in build_task(fixed, load_teacher(fixed))(_batch(fixed, build_task(fixed)))
    other = _cfg(synth, tmp_path, teacher_dir, **{"loss.kd.weights.kd_lm": 1.0})
    build_task(other, load_teacher(other))  # terms that do not read the temperature: fine


def test_a_student_trained_with_itc_has_a_known_temperature(tmp_path):
    start = dlip.create_model("test_tiny")
    start.config = start.config.replace(temp_known=False)
    start_dir = dlip.save(start, tmp_path / "from_hf")
    from dlip.train.finetune import finetune, load_config

    synthesize(tmp_path / "ft", 12, seed=0, image_size=32, captions_per_image=2, n_val=3,
               n_test=3)  # fmt: skip
    ft = load_config("retrieval", None, [
        f"model.checkpoint={start_dir}", f"data.synth_dir={tmp_path / 'ft'}", "data.batch_size=4",
        "data.num_workers=0", f"run_dir={tmp_path / 'ft_run'}", "run.max_steps=1",
        "loss.momentum_distill=false", "eval.k_test=2",
    ])  # fmt: skip
    final = finetune(ft, test=False)
    assert dlip.load(final).config.temp_known


class _Recorder(torch.nn.Module):
    """Stands in for the task: records the alpha the training step passes."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.student_m = object()  # a momentum encoder exists: alpha is ramped
        self.seen: list[float] = []

    def forward(self, batch, alpha: float = 0.0):
        self.seen.append(alpha)
        return {"loss_itc": self.w.sum() * 1.0}

    def after_step(self) -> None:
        pass


@pytest.mark.parametrize("kind, want", [("pretrain", 0.1), ("finetune", 0.2)])
def test_alpha_ramps_over_two_epochs_in_pretraining_and_one_in_finetuning(kind, want):
    """BLIP: pretrain.py ramps alpha over the first 2 epochs, train_retrieval.py over the
    first; halfway through epoch 0 (step 5 of 10) alpha is 0.4 * 5/20 or 0.4 * 5/10."""
    from dlip.train.config import FinetuneConfig, PretrainConfig
    from dlip.train.loop import train_step

    cfg = PretrainConfig() if kind == "pretrain" else FinetuneConfig()
    task = _Recorder()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    train_step(task, task, optimizer, [{}], cfg, step=5, steps_per_epoch=10, total_steps=100)
    assert task.seen == [pytest.approx(want)]


def test_the_teacher_sees_the_same_crop_at_its_size_and_with_its_statistics(synth, tmp_path):
    """A student at 64 px with CLIP statistics and a teacher at 32 px with ImageNet's: the
    teacher gets the crop re-normalised with its own mean / std and shrunk with antialiasing,
    equal to preparing the raw crop for the teacher directly; before, it got the student's
    normalisation, bicubic without antialias."""
    import torch.nn.functional as F

    from dlip.train.task import teacher_view

    imagenet = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}
    base = dlip.get_config("test_tiny")
    s_cfg, t_cfg = base.with_image_size(64), base.replace(**imagenet)
    g = torch.Generator().manual_seed(0)
    raw = (torch.rand(2, 3, 64, 64, generator=g) > 0.5).float()  # high frequencies alias

    def norm(x, cfg):
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.image_mean, cfg.image_std))
        return (x - mean) / std

    student_pixels = norm(raw, s_cfg)
    want = norm(F.interpolate(raw, size=(32, 32), mode="bicubic", antialias=True), t_cfg)
    got = teacher_view(student_pixels, s_cfg, t_cfg)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    old = F.interpolate(student_pixels, size=(32, 32), mode="bicubic", align_corners=False)
    assert (old - want).abs().max() > 0.5  # what the teacher saw before
    assert teacher_view(student_pixels, s_cfg, s_cfg) is student_pixels  # same view: untouched

    # and the task feeds exactly this view to the teacher's image tower
    teacher = dlip.create_model(t_cfg)
    teacher_dir = dlip.save(teacher, tmp_path / "teacher32")
    cfg = _cfg(synth, tmp_path, teacher_dir, **{"model.image_size": 64,
                                                "loss.kd.weights.kd_rep_image": 1.0})  # fmt: skip
    task = build_task(cfg, load_teacher(cfg)).eval()
    seen = []
    task.teacher.visual_encoder.patch_embed.register_forward_pre_hook(
        lambda m, a: seen.append(a[0])
    )
    batch = _batch(cfg, task)
    task(batch)
    torch.testing.assert_close(seen[0], teacher_view(batch["image"], task.student.config, t_cfg))


def test_trained_kd_projectors_travel_with_the_student(synth, tmp_path, teacher_dir, capsys):
    """final/ keeps the KD projectors (kd_adapters.safetensors; the model still loads without
    them) and KD finetuning from it starts from them instead of at random."""
    from safetensors.torch import load_file

    from dlip.train.finetune import build_task as build_finetune_task
    from dlip.train.finetune import load_config
    from dlip.train.pretrain import pretrain
    from dlip.train.task import KD_ADAPTERS_FILE

    kd = {"loss.kd.weights.kd_rep_text": 1.0, "loss.kd.weights.kd_hidden_image": 1.0}
    cfg = _cfg(synth, tmp_path, teacher_dir, **{"max_steps": 2, **kd})
    final = pretrain(cfg)
    saved = load_file(str(final / KD_ADAPTERS_FILE))
    assert set(saved) == {"kd_rep_text.weight", "kd_rep_text.bias", "kd_hidden_image.weight",
                          "kd_hidden_image.bias"}  # fmt: skip
    assert saved["kd_rep_text.weight"].shape == (64, 32)  # student 32 -> teacher 64
    assert dlip.load(final).config.name == "test_tiny"
    synthesize(tmp_path / "ft", 12, seed=0, image_size=32, captions_per_image=2, n_val=3,
               n_test=3)  # fmt: skip
    ft = load_config("retrieval", None, [
        f"model.checkpoint={final}", f"teacher.checkpoint={teacher_dir}",
        f"data.synth_dir={tmp_path / 'ft'}", "data.batch_size=4", "data.num_workers=0",
        f"run_dir={tmp_path / 'ft_run'}", "loss.momentum_distill=false",
        "loss.kd.weights.kd_rep_text=1.0", "loss.kd.weights.kd_rep_fusion=1.0",
    ])  # fmt: skip
    task = build_finetune_task(ft, load_teacher(ft))
    assert "KD projectors restored" in capsys.readouterr().out
    restored = task.adapters["kd_rep_text"].state_dict()
    assert torch.equal(restored["weight"], saved["kd_rep_text.weight"])
    assert torch.equal(restored["bias"], saved["kd_rep_text.bias"])
    assert "kd_rep_fusion.weight" not in saved  # a term pretraining did not train: as built
