"""Running a pyengine backend, timed and metered by the engine itself (usage)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pyengine.bench.measure import Phases, UsageEnergy


class EngineRunner:
    """A pyengine backend, timed and metered by the engine itself (usage)."""

    def __init__(self, name: str, path: Path, device: torch.device, meter, **options):
        import pyengine

        self.name = name
        self.engine = pyengine.load(path, backend=name, device=str(device), progress=False, **options)
        self.dtype = self.engine.dtype
        self.info = {"int8_method": self.engine.int8_method} if self.engine.int8_method else {}

    def run_prefill(self, rows, meter):
        # The bench's meter, so every backend is measured by the source the idle baseline came from.
        res = self.engine.generate([t for t, _ in rows], max_new_tokens=1, ignore_eos=True,
                                   measure_energy=meter or False)
        u = res[0].usage
        return Phases(prefill=(u.prefill_seconds, _usage_joules(res, "prefill_joules")), decode=None)

    def run_generate(self, rows, new_tokens, meter):
        res = self.engine.generate([t for t, _ in rows], max_new_tokens=new_tokens, ignore_eos=True,
                                   measure_energy=meter or False)
        for r in res:
            if len(r.token_ids) != new_tokens:
                raise RuntimeError(f"{self.name}: generated {len(r.token_ids)} tokens, expected {new_tokens} "
                                   f"(finish_reason {r.finish_reason!r})")
        u = res[0].usage
        return Phases(prefill=(u.prefill_seconds, _usage_joules(res, "prefill_joules")),
                      decode=(u.decode_seconds, _usage_joules(res, "decode_joules")))

    def greedy(self, rows, new_tokens):
        """Each row's greedy continuation (token ids), the rows as one batch."""
        results = self.engine.generate([t for t, _ in rows], max_new_tokens=new_tokens, ignore_eos=True)
        return [r.token_ids for r in results]

    def logits(self, ids):
        return self.engine.logits([ids])[0].cpu()

    def close(self):
        del self.engine


def _usage_joules(results, key):
    """The batch's joules of one phase from usage.energy (per-sequence shares add up to the batch)."""
    e = results[0].usage.energy
    if e is None:
        return None
    return UsageEnergy(joules=math.fsum(r.usage.energy[key] for r in results), source=e["source"],
                       estimated=e["estimated"], confidence=e["confidence"], fallback_reason=e.get("fallback_reason"),
                       confidence_reason=e["confidence_reason"], method=e["method"], constants=e["constants"])
