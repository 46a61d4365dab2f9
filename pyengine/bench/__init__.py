"""`pyengine bench`: HF transformers eager against pyengine's backends, speed and energy per token.

One process, one model, the same prompt token ids for every backend:

* ``hf-eager``: ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")`` in
  float32, the dtype pyengine's backends run in (on a CPU and on a GPU), greedy ``generate`` with
  exactly N new tokens (``min_new_tokens = max_new_tokens = N``). Its prefill is measured as one
  separate forward of the prompt batch that asks for the last position's logits only
  (``logits_to_keep=1``), as pyengine computes them, and **decode = generate - that prefill**
  (seconds and joules): HF's generate gives no phase split of its own.
* ``hf-eager-bf16`` / ``hf-eager-fp16``: the same in that dtype; run by default when the
  checkpoint is stored in it (the eager run a user of that checkpoint would make).
* every pyengine backend that ``available_backends(device)`` lists: ``pyengine.load(path,
  backend=...)`` then ``engine.generate(prompts, max_new_tokens=N, ignore_eos=True,
  measure_energy=True)``; seconds and joules per phase come from ``usage``.

Token accounting: prefill tokens = batch x prompt tokens; decode tokens = batch x (N - 1) (the
first new token comes out of the prefill forward, the other N - 1 out of decode steps); "per 1k
generated tokens" divides the whole generate call (short-prompt prefill + decode) by batch x N.
The prefill columns come from a separate measurement with a long prompt (--prefill-tokens),
where a prefill is long enough to measure; --prefill-tokens 0 uses the generate call's prefill.

Energy: one meter for the whole run. Idle is measured after the first model is loaded (on a GPU,
with its CUDA context up), in --idle-repeats windows, and again at the end; a drift beyond
IDLE_DRIFT_WARN is warned about. Every repeat opens windows around each phase; on NVML, where a
window shorter than NVML_MIN_WINDOW_S is unreliable, a run is repeated k = meter.repeats_for(seconds)
times inside one window, each phase is charged the window's average watts x its own seconds, and
the rest of the window (Python between runs, HF's second prefill inside generate) is reported as
overhead.

Bytes and the roofline (CPU): read bandwidth is probed at the start, after each backend and at the
end of the run (the highest is used: on a shared machine a probe can be slowed, never sped up); each row reports the bytes read per decoded token (pyengine.bench.roofline) and its
decode rate as a fraction of reading those bytes at that bandwidth.

Modules: cli (arguments), config (settings, checks), prompts, hf_runner and engine_runner (one
backend loaded at a time), measure (energy windows, idle, statistics), roofline_columns, run (the
whole bench), report (JSON, table), plot; serve is `pyengine bench-serve`.
"""
