"""Sampling settings: one plain dataclass, no torch (the HTTP adapters build it from JSON)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# KoboldCpp's sampler ids, as clients send them in ``sampler_order``
TOP_K, TOP_A, TOP_P, TFS, TYPICAL, TEMPERATURE, REP_PEN = range(7)
DEFAULT_ORDER: tuple[int, ...] = (REP_PEN, TOP_K, TOP_A, TFS, TYPICAL, TOP_P, TEMPERATURE)


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at (-1 = all)
    seed: int | None = None
    # --- the Kobold.cpp set (all off by default) ---
    top_a: float = 0.0  # 0 = off
    typical: float = 1.0  # 1 = off
    tfs: float = 1.0  # 1 = off
    repeat_slope: float = 1.0  # older half of the window gets 1 + (penalty - 1) * slope
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    sampler_order: tuple[int, ...] = DEFAULT_ORDER
    dynatemp_range: float = 0.0  # > 0: entropy-scaled temperature in [t - r, t + r]
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0  # quadratic sampling, 0 = off
    smoothing_curve: float = 1.0
    mirostat: int = 0  # 1 or 2 replaces the order list
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 320  # <= 0: the whole history
    dry_breakers: frozenset[int] = frozenset()  # token ids that end a DRY match
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 = off
    top_n_sigma: float = 0.0  # 0 = off (applied right before the temperature)
    logit_bias: dict[int, float] = field(default_factory=dict)  # id -> bias; <= -100 bans
    banned_ids: frozenset[int] = frozenset()

    @property
    def greedy_mode(self) -> bool:
        return self.temperature <= 0.0 and self.dynatemp_range <= 0.0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if self.repeat_penalty <= 0:
            raise ValueError("repeat_penalty must be > 0")
        if not 0.0 <= self.top_a <= 1.0:
            raise ValueError("top_a must be in [0, 1]")
        if not 0.0 < self.typical <= 1.0:
            raise ValueError("typical must be in (0, 1]")
        if not 0.0 < self.tfs <= 1.0:
            raise ValueError("tfs must be in (0, 1]")
        if self.mirostat not in (0, 1, 2):
            raise ValueError("mirostat must be 0, 1 or 2")
        if self.mirostat and (self.mirostat_tau <= 0 or self.mirostat_eta <= 0):
            raise ValueError("mirostat_tau and mirostat_eta must be > 0")
        if not self.sampler_order or any(s not in range(7) for s in self.sampler_order):
            raise ValueError("sampler_order must list sampler ids 0..6")
        if self.dynatemp_range < 0 or self.smoothing_factor < 0 or self.dry_multiplier < 0:
            raise ValueError("dynatemp_range, smoothing_factor and dry_multiplier must be >= 0")
        if self.dry_multiplier > 0 and (self.dry_base < 1.0 or self.dry_allowed_length < 1):
            raise ValueError("dry_base must be >= 1 and dry_allowed_length >= 1")
        if not 0.0 <= self.xtc_probability <= 1.0:
            raise ValueError("xtc_probability must be in [0, 1]")

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)


@dataclass(frozen=True)
class GrammarSpec:
    """A request's output constraint (``grammar.py`` compiles it): GBNF (llama.cpp's grammar
    language), a JSON schema (as JSON text), Lark or a regex; ``field`` names the request field
    it came from, for error messages."""

    kind: Literal["gbnf", "json_schema", "lark", "regex"]
    text: str
    field: str = "grammar"
