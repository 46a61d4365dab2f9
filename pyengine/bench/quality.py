"""Quality from logits: perplexity, KL divergence and top-1 agreement against a reference.

All functions take next-token logits ``[positions, vocab]`` (or ``[batch, positions, vocab]``,
flattened) and work in float64 for the reductions, so two identical inputs give exactly 0 KL.

Conventions (what ``pyengine bench`` reports):

* perplexity = exp(mean negative log-likelihood of each next token), over every predicted
  position of every window (a window of W tokens predicts W - 1 of them: tokens 1..W-1 from the
  logits at 0..W-2);
* KL = mean over positions of KL(reference || candidate) = sum_v p_ref(v) (log p_ref(v) - log p(v)),
  in nats;
* top-1 agreement = fraction of positions where argmax(candidate) == argmax(reference).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch


def _flat(logits: torch.Tensor) -> torch.Tensor:
    logits = torch.as_tensor(logits)
    if logits.dim() < 1:
        raise ValueError("logits must have a vocabulary dimension")
    if logits.dim() == 1:
        logits = logits[None]
    return logits.reshape(-1, logits.shape[-1]).double()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats) of ``targets`` [positions] under ``logits`` [positions, vocab]."""
    lp = torch.log_softmax(_flat(logits), dim=-1)
    targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if targets.numel() != lp.shape[0]:
        raise ValueError(f"{targets.numel()} targets for {lp.shape[0]} positions of logits")
    return -lp.gather(1, targets[:, None]).squeeze(1)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL). A uniform distribution over V tokens gives exactly V."""
    return math.exp(float(nll(logits, targets).mean()))


def kl_per_position(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || candidate) at each position, in nats."""
    ref, cand = _flat(ref_logits), _flat(logits)
    if ref.shape != cand.shape:
        raise ValueError(f"reference logits {tuple(ref.shape)} and candidate logits {tuple(cand.shape)} differ in shape")
    ref_lp = torch.log_softmax(ref, dim=-1)
    cand_lp = torch.log_softmax(cand, dim=-1)
    # p * (log p - log q), with 0 * anything = 0 where the reference gives a token no mass
    terms = torch.where(ref_lp.isinf(), torch.zeros_like(ref_lp), ref_lp.exp() * (ref_lp - cand_lp))
    return terms.sum(-1).clamp_min(0.0)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(ref || candidate), in nats."""
    return float(kl_per_position(ref_logits, logits).mean())


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions whose most likely next token is the same in both."""
    ref, cand = _flat(ref_logits), _flat(logits)
    if ref.shape != cand.shape:
        raise ValueError(f"reference logits {tuple(ref.shape)} and candidate logits {tuple(cand.shape)} differ in shape")
    return float((ref.argmax(-1) == cand.argmax(-1)).double().mean())


def windows(ids: list[int], max_tokens: int, window: int) -> list[list[int]]:
    """The first ``max_tokens`` ids cut into non-overlapping windows of ``window`` (the last, shorter
    one is kept if it has at least 2 tokens, i.e. predicts something)."""
    if window < 2:
        raise ValueError(f"a quality window must hold at least 2 tokens, got {window}")
    ids = list(ids[:max_tokens])
    out = [ids[i:i + window] for i in range(0, len(ids), window)]
    return [w for w in out if len(w) >= 2]


def greedy_prompts(ids: list[int], count: int, length: int) -> list[list[int]]:
    """Up to `count` prompts of `length` tokens each, evenly spaced over the corpus token ids."""
    if length < 1 or count < 1:
        raise ValueError(f"greedy prompts need count >= 1 and length >= 1, got {count} and {length}")
    if len(ids) < length:
        return []
    count = min(count, len(ids) // length)
    stride = (len(ids) - length) // (count - 1) if count > 1 else 0
    return [list(ids[i * stride:i * stride + length]) for i in range(count)]


def greedy_agreement(reference: list[list[int]], tokens: list[list[int]]) -> dict:
    """How far each prompt's greedy continuation follows the reference's: the share of prompts whose
    continuation is the same token for token, and the mean number of tokens before the first
    difference."""
    if len(reference) != len(tokens) or not reference:
        raise ValueError(f"greedy agreement needs one continuation per reference prompt, got {len(tokens)} "
                         f"for {len(reference)}")
    before = []
    for ref, out in zip(reference, tokens):
        before.append(next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out))))
    same = sum(n == len(ref) == len(out) for n, ref, out in zip(before, reference, tokens))
    return {"greedy_prompts": len(reference), "greedy_same_share": same / len(reference),
            "greedy_tokens_before_difference": sum(before) / len(before)}


@dataclass
class QualityResult:
    perplexity: float
    positions: int
    windows: int
    kl: float | None = None  # vs the reference; None for the reference itself or without one
    top1_agreement: float | None = None
    reference: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": math.log(self.perplexity), "positions": self.positions,
                "windows": self.windows, "kl": self.kl, "top1_agreement": self.top1_agreement,
                "reference": self.reference, **self.extra}


def evaluate(logits_fn: Callable[[list[int]], torch.Tensor], wins: Iterable[list[int]],
             reference: list[torch.Tensor] | None = None, reference_name: str | None = None,
             keep: bool = False, progress=None) -> tuple[QualityResult, list[torch.Tensor] | None]:
    """Score ``logits_fn`` (ids -> [seq, vocab] logits) on each window.

    With ``reference`` (the kept logits of a previous evaluate(..., keep=True), one tensor per
    window) KL and top-1 agreement are computed too. Returns (result, kept logits or None)."""
    total_nll, positions, kl_sum, agree, n_windows = 0.0, 0, 0.0, 0, 0
    kept: list[torch.Tensor] | None = [] if keep else None
    for i, w in enumerate(wins):
        logits = torch.as_tensor(logits_fn(w)).float()
        logits = logits.reshape(-1, logits.shape[-1])[: len(w) - 1]  # positions that predict a token
        targets = torch.tensor(w[1:], dtype=torch.long)
        total_nll += float(nll(logits, targets).sum())
        positions += len(w) - 1
        n_windows += 1
        if reference is not None:
            ref = reference[i]
            kl_sum += float(kl_per_position(ref, logits).sum())
            agree += int((ref.argmax(-1) == logits.argmax(-1)).sum())
        if kept is not None:
            kept.append(logits.cpu())
        if progress is not None:
            progress.update(1)
    if positions == 0:
        raise ValueError("no positions to score: the corpus is too short for one window of 2 tokens")
    result = QualityResult(perplexity=math.exp(total_nll / positions), positions=positions, windows=n_windows)
    if reference is not None:
        result.kl = kl_sum / positions
        result.top1_agreement = agree / positions
        result.reference = reference_name
    return result, kept
