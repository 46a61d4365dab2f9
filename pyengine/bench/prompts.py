"""The bench's inputs: prompts cut to an exact number of tokens, and the corpus for the quality scores."""
from __future__ import annotations

import math
from pathlib import Path

from pyengine.bench.config import GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS


# The prompts: slices of this paragraph (repeated as needed), cut to an exact number of tokens.
PROMPT_TEXT = (
    "A small town at the edge of a river kept a record of every flood for two hundred years. The clerks wrote "
    "the height of the water on the wall of the mill, the date beside it, and sometimes a short note about the "
    "harvest or the price of bread. Today the marks form a ladder of dates that climbs from the floor to the "
    "roof beams, and visitors stand in front of it trying to imagine the river reaching that high. Engineers "
    "who came to study the wall found that it told them more than any model: when the old bridge was built the "
    "floods grew higher, when the marshes upstream were drained they came faster, and when the new weir was "
    "finished they became rare. The lesson they took away was simple. Write down what happened, write down how "
    "you measured it, and be honest about what you guessed. A careful record outlives the people who kept it, "
    "and it lets strangers answer questions that nobody thought to ask at the time."
)


def build_prompts(tokenizer, n_tokens: int, batch: int, *, stride: int = 13) -> list[tuple[str, list[int]]]:
    """``batch`` different prompts that each encode (as Engine.generate encodes them) to exactly
    ``n_tokens`` ids: slices of PROMPT_TEXT repeated, starting ``stride`` tokens apart."""
    base = tokenizer.encode(PROMPT_TEXT + " ", add_special_tokens=False)
    reps = math.ceil((n_tokens + stride * (batch + 20) + 32) / max(len(base), 1)) + 1
    stream = tokenizer.encode(" ".join([PROMPT_TEXT] * reps), add_special_tokens=False)
    out = []
    for b in range(batch):
        start = b * stride
        for shift in range(40):
            found = _exact_slice(tokenizer, stream, start + shift, n_tokens)
            if found is not None and found[1] not in [ids for _, ids in out]:
                out.append(found)
                break
        else:
            raise ValueError(f"could not cut a prompt of exactly {n_tokens} tokens from the prompt text")
    return out


def _exact_slice(tokenizer, stream, start, n_tokens):
    k = n_tokens
    for _ in range(8):
        if k < 1 or start + k > len(stream):
            return None
        text = tokenizer.decode(stream[start:start + k])
        ids = tokenizer.encode(text, add_special_tokens=True)
        if len(ids) == n_tokens and text.strip():
            return text, ids
        k += n_tokens - len(ids)
    return None


def greedy_rows(tokenizer, ids: list[int], count: int = GREEDY_PROMPTS,
                length: int = GREEDY_PROMPT_TOKENS) -> list[tuple[str, list[int]]]:
    """Prompts for the greedy-agreement check: slices of the corpus ids, evenly spaced, kept where
    their text encodes back (as Engine.generate encodes it) to exactly `length` ids, so that every
    backend, HF's included, starts from the same ids, and the batch needs no padding."""
    from pyengine.bench import quality

    found = (_exact_slice(tokenizer, piece, 0, length) for piece in quality.greedy_prompts(ids, count, length))
    return [row for row in found if row is not None]


def corpus_ids(tokenizer, path: Path, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` tokens of a text file (only as much of it is read as needed)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        chars = max(4096, n_tokens * 8)
        while True:
            f.seek(0)
            text = f.read(chars)
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) > n_tokens or len(text) < chars:
                return ids[:n_tokens]
            chars *= 2
