"""What `dlip demo` trains: the data, the three models and the step budgets (full and --quick).

Every stage is an ordinary dlip run: the demo writes its yaml to RUN/configs/ and hands it to
the same `run()` that `dlip pretrain` / `dlip finetune` use, so each stage can be rerun by hand
with the printed command.

Choices, and why (measured on a 2-core CPU, see docs/demo.md):
- Data: `dlip data synth` scenes with two objects and no minimal-edit pairs (contrast 0): hard
  enough that retrieval must bind colours to shapes and read the relation, easy enough for a
  from-scratch model to learn in minutes.
- Teacher: BLIP-shaped (ViT + BERT-style encoder/decoder with cross-attention), width 96, 4+4
  layers at 64 px. Student: width 64, 2+2 layers: ~3x fewer image FLOPs (31%); parameters are
  dominated by the 30524-token word embeddings, so parameters shrink less (57%).
- Towers trained from scratch first collapse: BERT's N(0, 0.02) init leaves a small text
  tower's [CLS] the same for every caption and ITC sits at ln(batch) for ~270 steps. Wider
  attention value / output maps at init (`model.text_value_output_std`), a soft initial
  temperature and no dropout leave that plateau in ~60 steps, and 800 teacher steps reach a
  teacher that retrieves well and whose ITM re-ranking helps.
- The KD student starts from the teacher cut to its width (`model.init=inherit_pruned`) and
  learns from every KD term; the no-KD student, same shape, same steps, starts at random and
  learns from the data alone. The ablation (benchmarks/ablations.py) separates the two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

TEACHER_ARCH = {
    "vision": {"width": 96, "depth": 4, "num_heads": 4},
    "text": {"hidden_size": 96, "num_layers": 4, "num_heads": 4, "intermediate_size": 192,
             "dropout": 0.0},
}  # fmt: skip
STUDENT_PRESET = "test_tiny"  # 2+2 layers, embed_dim 16; widened to 64 by STUDENT_ARCH
# Width 64, 4 heads of 16 (the teacher: 96, 4 heads of 24), half the teacher's depth: ~3x
# fewer image FLOPs. Width 32 (test_tiny's own) kept only ~63% of the teacher's r_mean.
STUDENT_ARCH = {
    "vision": {"width": 64, "num_heads": 4},
    "text": {"hidden_size": 64, "num_heads": 4, "intermediate_size": 128, "dropout": 0.0},
}  # fmt: skip
# The KD student starts from the teacher's weights cut to its width (TinyCLIP-style; DLIP
# initialises its students from the teacher too); the no-KD student starts at random.
STUDENT_KD_INIT = "inherit_pruned"
IMAGE_SIZE = 64
TEMP_INIT = 0.3  # initial ITC temperature of the three from-scratch models (BLIP: 0.07)
TEXT_VALUE_OUTPUT_STD = 0.1  # model.text_value_output_std (BERT: 0.02) of the three models
# DLIP's multi-module distillation: logits, representations, hidden states and attention maps.
KD_WEIGHTS = {
    "kd_itc": 1.0, "kd_itm": 1.0, "kd_lm": 1.0,
    "kd_rep_image": 1.0, "kd_rep_text": 1.0, "kd_rep_fusion": 1.0,
    "kd_hidden_image": 1.0, "kd_attn_fusion": 1.0, "kd_attn_cross": 1.0, "kd_attn_decoder": 1.0,
}  # fmt: skip
MODELS = ("teacher", "student_kd", "student_nokd")
TASKS = ("retrieval", "caption")
# VQA (BLIP_VQA's form of each pretrained model) on the synthetic questions (`dlip data synth`):
# the same short recipe for the three, answers ranked from the set's answer list.
VQA = "vqa"
# Finetuning lr per task, the same for the three models. Retrieval: 1e-4 (1e-3 measured worse
# for all three). Captioning: 1e-3, which the students' short LM pretraining needs to learn to
# caption after the prompt (with 1e-4 they stop after "a big": CIDEr 0.04 vs 0.29).
FINETUNE_LR = {"retrieval": 1.0e-4, "caption": 1.0e-3, "vqa": 1.0e-3}


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and step counts; `full()` is `make demo`, `quick()` is the test-suite run."""

    name: str
    train_images: int
    val_images: int
    test_images: int
    batch_size: int
    teacher_steps: int
    student_steps: int
    finetune_steps: int  # per model, retrieval and captioning
    vqa_steps: int  # per model: VQA finetuning (60 steps left every model near its prior)
    k_test: int  # ITM re-rank candidates in retrieval evaluation
    latency_repeats: int
    seed: int = 0

    @classmethod
    def full(cls) -> DemoPlan:
        return cls(
            name="full", train_images=1000, val_images=50, test_images=100, batch_size=32,
            teacher_steps=800, student_steps=400, finetune_steps=60, vqa_steps=300, k_test=16,
            latency_repeats=30,
        )  # fmt: skip

    @classmethod
    def quick(cls) -> DemoPlan:
        return cls(
            name="quick", train_images=96, val_images=8, test_images=16, batch_size=16,
            teacher_steps=12, student_steps=8, finetune_steps=4, vqa_steps=4, k_test=4,
            latency_repeats=2,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)
