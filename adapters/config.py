"""Configs: the adapter (what the layer is) and the prompt format (how a question becomes K choice logits).

Both are frozen dataclasses validated in `__post_init__` and written beside every adapter they produce.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

METHODS = ("dalorra", "lora", "map", "mcdropout", "ensemble")
MODES = ("letter", "cloze")
MASK_SHARING = ("module", "rank", "layer")
NORMALIZE = ("none", "tokens", "chars")

LETTER_TEMPLATE = (
    "Select one of the choices that answers the following question: {question} Choices: {choices} Answer:"
)
CLOZE_TEMPLATE = "Question: {question}\nAnswer:"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class AdapterConfig:
    """Shape of a (DALorRA or plain) LoRA adapter."""

    method: str = "dalorra"  # dalorra | lora | map | mcdropout | ensemble (how it was trained)
    r: int = 8  # rank of every adapted module
    alpha: float = 16.0  # LoRA scale numerator: ΔW = (alpha / r) B diag(z) A
    targets: tuple[str, ...] = ("q_proj", "v_proj", "lm_head")  # module-name suffixes to adapt
    layers: tuple[int, ...] | None = (
        None  # decoder layer indices to adapt (None: all); lm_head is always kept if targeted
    )
    p0: float = 0.5  # prior keep-probability of each rank component
    tau: float = 2.0 / 3.0  # binary-Concrete temperature for training masks
    hard: bool = True  # straight-through hard masks while training
    dropout: float = 0.0  # LoRA input dropout (mcdropout uses 0.1 and keeps it on at test time)
    stochastic: bool = True  # False: masks are all on (plain LoRA / MAP)
    # Which modules share one switch per rank index (one φ_j and one draw z_j): "module" (the paper) none;
    # "rank" every layer's module of one kind (all q_proj share z_j); "layer" the q_proj and v_proj of one layer.
    mask_sharing: str = "module"

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"method={self.method!r} is not one of {METHODS}")
        _check(isinstance(self.r, int) and self.r >= 1, f"r={self.r!r} must be a positive integer")
        _check(self.alpha > 0, f"alpha={self.alpha} must be > 0")
        _check(len(self.targets) > 0, "targets is empty: name at least one module, e.g. q_proj")
        _check(0.0 < self.p0 < 1.0, f"p0={self.p0} must lie strictly between 0 and 1 (try 0.5)")
        _check(self.tau > 0, f"tau={self.tau} must be > 0 (default 2/3)")
        _check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        _check(
            self.mask_sharing in MASK_SHARING,
            f"mask_sharing={self.mask_sharing!r} is not one of {MASK_SHARING}",
        )
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def prior_logit(self) -> float:
        return math.log(self.p0 / (1.0 - self.p0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        _check(not unknown, f"unknown adapter config keys {sorted(unknown)}")
        d = dict(d)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        return cls(**d)


@dataclass(frozen=True)
class PromptFormat:
    """How one multiple-choice item becomes K choice logits (DESIGN §3, 'Scoring modes')."""

    mode: str = (
        "cloze"  # letter: last-position logits of the K letter tokens; cloze: log-likelihood of each choice
    )
    template: str = ""  # "" picks the mode's default template; fields {question} {context} {choices}
    normalize: str = (
        "tokens"  # cloze only: none (summed log-prob) | tokens (mean per token) | chars (per character)
    )
    max_length: int = 256  # prompt tokens kept (left-truncated); continuation tokens are capped at 64
    letters: tuple[str, ...] = field(default_factory=lambda: tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))

    def __post_init__(self) -> None:
        _check(self.mode in MODES, f"mode={self.mode!r} is not one of {MODES}")
        _check(self.normalize in NORMALIZE, f"normalize={self.normalize!r} is not one of {NORMALIZE}")
        _check(self.max_length >= 8, f"max_length={self.max_length} is too small (>= 8)")
        if not self.template:
            object.__setattr__(self, "template", LETTER_TEMPLATE if self.mode == "letter" else CLOZE_TEMPLATE)
        _check("{question}" in self.template, "template must contain {question}")
        if self.mode == "letter":
            _check("{choices}" in self.template, "letter template must contain {choices}")
        object.__setattr__(self, "letters", tuple(self.letters))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["letters"] = "".join(self.letters)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PromptFormat:
        d = dict(d)
        if isinstance(d.get("letters"), str):
            d["letters"] = tuple(d["letters"])
        return cls(**d)
