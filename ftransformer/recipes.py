"""Training recipes: the defaults ``ftransformer train`` uses for each model preset.

A recipe is everything about a run that is not the architecture (that is the preset's ``Config``):
tokenizer, split, batch, schedule, optimizer and evaluation settings. ``optimizer_for`` turns one into
the optimizer it describes.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ftransformer import optim
from ftransformer import validate
from ftransformer.data import TOKENIZER_KINDS
from ftransformer.loop import FitSettings

WARMUP_FORMS = ("nanogpt", "zero")


@dataclass(frozen=True)
class TrainRecipe:
    """Training settings for one preset. Every field can be changed with ``--set field=value``."""

    batch_size: int  # sequences per optimizer step (split into accum_steps micro-batches)
    seq_len: int  # tokens per training window (at most the model's max_seq_len)
    steps: int  # optimizer steps of a full run
    lr: float  # peak learning rate, reached after warmup_steps
    warmup_steps: int  # linear warm-up to lr over this many steps
    min_lr_ratio: float = 0.1  # the cosine decay ends at lr * min_lr_ratio at the last step
    # "nanogpt": update it (from 0) gets lr*(it+1)/(warmup_steps+1), so the first update already moves;
    # "zero": lr*it/warmup_steps, the first update at lr 0 (optim.warmup_cosine's own shape).
    warmup_form: str = "nanogpt"
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices and embeddings (not norms or biases)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    accum_steps: int = 1  # micro-batches per step: same update, less memory
    eval_every: int = 250  # steps between evaluations (and checkpoints)
    eval_batches: int | str = 20  # fixed batches in each of the train and val loss estimates; "all": the whole val split
    tokenizer: str = "char"  # "char" or "bpe" (byte-level BPE trained on the corpus)
    bpe_vocab_size: int = 2048  # BPE vocabulary size (the 256 byte symbols included)
    val_fraction: float = 0.1  # the last this much of the corpus validates (contiguous split)

    def __post_init__(self):
        for name in ("batch_size", "seq_len", "steps", "accum_steps", "eval_every", "bpe_vocab_size"):
            value = getattr(self, name)
            validate.int_at_least(name, value, 1)
        e = self.eval_batches
        if e != "all" and (not validate.is_int(e) or e < 1):
            raise ValueError(f"eval_batches must be an int >= 1 or 'all', got {e!r}")
        validate.non_negative_int("warmup_steps", self.warmup_steps)
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by accum_steps={self.accum_steps}")
        validate.one_of("warmup_form", self.warmup_form, WARMUP_FORMS)
        validate.one_of("tokenizer", self.tokenizer, TOKENIZER_KINDS)
        if self.tokenizer == "bpe" and self.bpe_vocab_size < 257:
            raise ValueError(f"bpe_vocab_size must be >= 257 (256 byte symbols + merges), got {self.bpe_vocab_size}")
        for name in ("lr", "eps", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not validate.is_number(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not validate.is_number(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not validate.is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")

    def replace(self, **changes) -> "TrainRecipe":
        """A copy with some fields changed (validated again); an unknown field raises ``ValueError``."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"TrainRecipe has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The recipe's fields as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainRecipe":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def schedule_for(recipe: TrainRecipe, steps: int | None = None, *, peak: float | None = None) -> optim.Schedule:
    """The recipe's learning rate per update: warm-up (``warmup_form``), then cosine to ``min_lr_ratio`` of
    ``peak`` (default: the recipe's ``lr``) at ``steps`` (default: the recipe's), then constant.

    The cosine phase is ``optim.warmup_cosine``'s; only the warm-up steps differ between the forms.
    """
    steps = recipe.steps if steps is None else steps
    warmup = min(recipe.warmup_steps, steps)
    peak = recipe.lr if peak is None else peak
    base = optim.warmup_cosine(peak, warmup, steps, peak * recipe.min_lr_ratio)
    if recipe.warmup_form == "zero" or warmup == 0:
        return base
    rise = peak / (warmup + 1)

    def schedule(step):
        if isinstance(step, Tensor):
            return torch.where(step < warmup, (step.to(torch.float32) + 1) * rise, base(step))
        return (step + 1) * rise if step < warmup else base(step)

    return schedule


def optimizer_for(recipe: TrainRecipe, steps: int | None = None) -> optim.GradientTransformation:
    """Clip (if ``grad_clip``), then AdamW on ``schedule_for(recipe, steps)``."""
    schedule = schedule_for(recipe, steps)
    adamw = optim.adamw(schedule, betas=(recipe.beta1, recipe.beta2), eps=recipe.eps, weight_decay=recipe.weight_decay)
    if recipe.grad_clip > 0:
        return optim.chain(optim.clip_by_global_norm(recipe.grad_clip), adamw)
    return adamw


RECIPES: dict[str, TrainRecipe] = {
    # Seconds on a CPU: for tests and trying flags.
    "tiny": TrainRecipe(batch_size=8, seq_len=16, steps=200, lr=3e-3, warmup_steps=20, eval_every=50, eval_batches=4),
    # The learning path's ~5.8M-parameter model: BPE with the preset's 10k vocabulary, nanoGPT-like schedule.
    "seed": TrainRecipe(
        batch_size=16, seq_len=256, steps=5000, lr=6e-4, warmup_steps=200, beta2=0.95, eval_every=500,
        tokenizer="bpe", bpe_vocab_size=10000,
    ),
    # nanoGPT's shakespeare_char recipe at CPU size (nanoGPT reports val loss 1.88 at 2000 steps).
    "shakespeare-char-cpu": TrainRecipe(
        batch_size=12, seq_len=64, steps=2000, lr=1e-3, warmup_steps=100, beta2=0.99, eval_every=250, eval_batches=20,
    ),
    # nanoGPT's shakespeare_char recipe as published (GPU-sized).
    "shakespeare-char": TrainRecipe(
        batch_size=64, seq_len=256, steps=5000, lr=1e-3, warmup_steps=100, beta2=0.99, eval_every=250, eval_batches=200,
    ),
    # nanoGPT's GPT-2 recipe: ~0.5M tokens per step through 40 micro-batches of 12.
    "gpt2": TrainRecipe(
        batch_size=480, seq_len=1024, steps=600000, lr=6e-4, warmup_steps=2000, beta2=0.95, accum_steps=40,
        eval_every=2000, eval_batches=200, tokenizer="bpe", bpe_vocab_size=50257,
    ),
    "gpt2-medium": TrainRecipe(
        batch_size=480, seq_len=1024, steps=600000, lr=3e-4, warmup_steps=2000, beta2=0.95, accum_steps=40,
        eval_every=2000, eval_batches=200, tokenizer="bpe", bpe_vocab_size=50257,
    ),
}

# `ftransformer train` with no arguments: this preset's recipe, shortened so it finishes in a minute or two on a CPU.
QUICKSTART_PRESET = "shakespeare-char-cpu"
QUICKSTART_STEPS = 1000


def fit_settings(recipe: TrainRecipe, seed: int = 0) -> FitSettings:
    """The ``loop.FitSettings`` of a recipe: its steps, batches and evaluation, with ``seed``."""
    return FitSettings(steps=recipe.steps, batch_size=recipe.batch_size, seq_len=recipe.seq_len,
                       accum_steps=recipe.accum_steps, eval_every=recipe.eval_every,
                       eval_batches=recipe.eval_batches, seed=seed)


def get_recipe(preset: str) -> TrainRecipe:
    """The training recipe of ``preset`` (every preset in ``PRESETS`` has one)."""
    if preset not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset!r}; presets with recipes: {', '.join(RECIPES)}")
    return RECIPES[preset]


__all__ = [
    "QUICKSTART_PRESET", "QUICKSTART_STEPS", "RECIPES", "TrainRecipe", "WARMUP_FORMS", "fit_settings", "get_recipe", "optimizer_for",
    "schedule_for",
]
