"""Running HF transformers eager, the baseline, one variant (dtype) at a time."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pyengine.bench.config import HF, HF_VARIANTS
from pyengine.bench.measure import Phases


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HFRunner:
    """transformers eager: prefill = one forward of the prompt batch (last position's logits only,
    as pyengine), decode = generate - prefill."""

    info: dict = {}  # nothing to add to the load record

    def __init__(self, path: Path, device: torch.device, name: str = HF):
        import transformers

        transformers.logging.set_verbosity_error()
        self.name = name
        self.device = device
        self.dtype = HF_VARIANTS[name]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, attn_implementation="eager", dtype=self.dtype).to(device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen is not None else None
        pad = gen.pad_token_id if gen is not None and gen.pad_token_id is not None else eos
        if isinstance(pad, list):
            pad = pad[0]
        self.gen_kwargs = dict(do_sample=False, eos_token_id=eos, pad_token_id=pad if pad is not None else 0,
                               temperature=None, top_p=None, top_k=None)

    def _ids(self, rows):
        return torch.tensor([ids for _, ids in rows], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def forward(self, ids):
        # One position's logits, as pyengine's prefill: logits at every position would be ~27% more
        # matmul work on the default model and inflate every prefill ratio.
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)
        _sync(self.device)
        return out

    @torch.inference_mode()
    def run_prefill(self, rows, meter):
        ids = self._ids(rows)
        w = meter.start("prefill") if meter else None
        t0 = time.perf_counter()
        self.forward(ids)
        seconds = time.perf_counter() - t0
        m = meter.stop(w) if meter else None
        return Phases(prefill=(seconds, m), decode=None)

    @torch.inference_mode()
    def run_generate(self, rows, new_tokens, meter):
        ids = self._ids(rows)
        wp = meter.start("prefill") if meter else None
        t0 = time.perf_counter()
        self.forward(ids)
        prefill_s = time.perf_counter() - t0
        mp = meter.stop(wp) if meter else None
        wg = meter.start("generate") if meter else None
        t1 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **self.gen_kwargs)
        _sync(self.device)
        gen_s = time.perf_counter() - t1
        mg = meter.stop(wg) if meter else None
        generated = out.shape[1] - ids.shape[1]
        if generated != new_tokens:
            raise RuntimeError(f"{self.name}: generate produced {generated} tokens, expected {new_tokens}")
        # decode = generate - prefill: HF's generate has no phase split of its own
        return Phases(prefill=(prefill_s, mp), decode=(max(gen_s - prefill_s, 0.0), mg), decode_is_total=True)

    @torch.inference_mode()
    def run_generate_only(self, rows, new_tokens, meter):
        """generate() alone in one window (no separate prefill forward): (seconds, measurement)."""
        ids = self._ids(rows)
        w = meter.start("generate") if meter else None
        t0 = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, **self.gen_kwargs)
        _sync(self.device)
        seconds = time.perf_counter() - t0
        return seconds, (meter.stop(w) if meter else None)

    @torch.inference_mode()
    def greedy(self, rows, new_tokens):
        """Each row's greedy continuation (token ids), the rows as one batch."""
        ids = self._ids(rows)
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, **self.gen_kwargs)
        return out[:, ids.shape[1]:].tolist()

    @torch.inference_mode()
    def logits(self, ids):
        t = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(input_ids=t).logits[0].float().cpu()

    def close(self):
        del self.model
