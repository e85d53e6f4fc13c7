"""The `eval` section of the typed config (`pipeline.schema` composes it under the root): generation budget,
thinking switch, KL prompts and tokens, generation and streaming switches, and the judges' settings (documented in
conf/eval/default.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import List, Optional

from omegaconf import MISSING

from pipeline.schema_fields import section, setting


class Thinking(StrEnum):
    off = "off"
    on = "on"
    template = "template"


class Streaming(StrEnum):
    """`collect.streaming` and `eval.streaming`."""

    off = "off"  # the model in memory (or placed by accelerate), every batch through every layer
    layers = "layers"  # pipeline.layer_stream: every batch through one decoder layer at a time, each weight read once
    auto = "auto"  # layers when the model does not fit the memory accelerate would give it


class EvalSplit(StrEnum):
    eval = "eval"
    validation = "validation"


class JudgeName(StrEnum):
    markers = "markers"
    classifier = "classifier"
    llm = "llm"


class ClassifierInput(StrEnum):
    answer = "answer"
    prompt_answer = "prompt_answer"


@dataclass
class OpeningConfig:
    sentences: int = setting(ge=1)
    chars: int = setting(ge=1)


@dataclass
class DegenerateConfig:
    loop_repeats: int = setting(ge=2)
    loop_min_chars: int = setting(ge=1)
    ngram: int = setting(ge=1)
    min_words: int = setting(ge=2)
    max_repeated_ngram_share: float = setting(ge=0, le=1)
    min_letters: int = setting(ge=1)
    min_script_share: float = setting(ge=0, le=1)
    min_letter_share: float = setting(ge=0, le=1)


@dataclass
class ClassifierJudgeConfig:
    path: Optional[str] = MISSING
    refusal_labels: List[str] = MISSING
    input: ClassifierInput = MISSING
    max_length: int = setting(ge=1)
    batch_size: int = setting(ge=1)


@dataclass
class LLMJudgeConfig:
    url: Optional[str] = MISSING
    model: Optional[str] = MISSING
    api_key_env: Optional[str] = MISSING
    max_tokens: int = setting(ge=1)
    timeout_s: float = setting(ge=0)
    retries: int = setting(ge=0)
    concurrency: int = setting(ge=1)


@dataclass
class EvalConfig:
    max_new_tokens: int = setting(ge=1)
    harmless_max_new_tokens: int = setting(ge=1)
    reasoning_tokens: int = setting(ge=0)
    early_stop: bool = MISSING
    thinking: Thinking = MISSING
    batch_size: int = setting(ge=1)
    kl_prompts: int = setting(ge=1)
    kl_tokens: int = setting(ge=1)
    split: EvalSplit = MISSING
    generate: bool = MISSING
    streaming: Streaming = MISSING  # off | layers | auto, forward-only numbers (not in the cache key: equal within 1e-5)
    judge: JudgeName = MISSING
    refusal_markers: List[str] = MISSING
    late_refusal_markers: List[str] = MISSING
    turn_words: List[str] = MISSING
    turn_window: int = setting(ge=1)
    clarifying_markers: List[str] = MISSING
    clarify_max_sentences: int = setting(ge=1)
    opening: OpeningConfig = section(OpeningConfig)
    degenerate: DegenerateConfig = section(DegenerateConfig)
    classifier: ClassifierJudgeConfig = section(ClassifierJudgeConfig)
    llm: LLMJudgeConfig = section(LLMJudgeConfig)
