"""`pyengine bench`: end to end on tiny models (JSON schema, plot, labels), the quality maths against
hand-computed values, and the argument checks."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pyengine.bench import quality
from pyengine.bench import config as bench_config, measure, report as bench_report, run as bench_run
from pyengine.bench.engine_runner import EngineRunner
from pyengine.bench.hf_runner import HFRunner
from pyengine.bench.plot import plot
from pyengine.bench.prompts import build_prompts
from pyengine.cli import main


def strict_json(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (not JSON; Python's parser takes them)."""
    def reject(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=reject)

# ---- JSON schema ---------------------------------------------------------------------------------

NUM = {"type": "number"}
NUM_OR_NULL = {"type": ["number", "null"]}
STAT = {"type": ["object", "null"], "required": ["median", "min", "max", "q1", "q3", "n"],
        "properties": {k: NUM for k in ("median", "min", "max", "q1", "q3")}}
PHASE = {"type": "object", "required": ["tokens", "seconds", "joules", "active_joules", "tokens_per_s",
                                        "joules_per_token"],
         "properties": {"tokens": {"type": "integer", "minimum": 0}, "seconds": NUM, "joules": NUM_OR_NULL,
                        "active_joules": NUM_OR_NULL, "tokens_per_s": NUM_OR_NULL, "joules_per_token": NUM_OR_NULL}}
ENERGY = {"type": "object", "required": ["source", "estimated", "confidence", "fallback_reason"],
          "properties": {"source": {"type": "string"}, "estimated": {"type": "boolean"},
                         "confidence": {"enum": ["high", "low"]}, "fallback_reason": {"type": ["string", "null"]}}}
REPEAT = {"type": "object", "required": ["prefill", "decode", "generate", "energy", "runs_per_window"],
          "properties": {"prefill": PHASE, "decode": PHASE, "generate": PHASE, "energy": ENERGY,
                         "runs_per_window": {"type": "integer", "minimum": 1}}}
SUMMARY_KEYS = ["prefill_tokens_per_s", "decode_tokens_per_s", "prefill_joules_per_token", "decode_joules_per_token",
                "prefill_active_joules_per_token", "decode_active_joules_per_token", "average_watts",
                "g_co2e_per_1k_tokens"]
RESULT = {"type": "object",
          "required": ["backend", "batch_size", "dtype", "load_seconds", "energy", "summary", "vs_hf_eager", "repeats"],
          "properties": {"backend": {"type": "string"}, "batch_size": {"type": "integer", "minimum": 1},
                         "energy": ENERGY, "repeats": {"type": "array", "minItems": 1, "items": REPEAT},
                         "summary": {"type": "object", "required": SUMMARY_KEYS,
                                     "properties": {k: STAT for k in SUMMARY_KEYS}},
                         "vs_hf_eager": {"type": ["object", "null"]}}}
QUALITY_ENTRY = {"type": "object", "required": ["perplexity", "positions", "kl", "top1_agreement", "ppl_delta"],
                 "properties": {"perplexity": NUM, "positions": {"type": "integer"}, "kl": NUM_OR_NULL,
                                "top1_agreement": NUM_OR_NULL, "ppl_delta": NUM_OR_NULL}}
SCHEMA = {
    "type": "object",
    "required": ["schema_version", "config", "model", "machine", "energy", "carbon", "prompts", "results", "quality",
                 "tradeoffs", "notes"],
    "properties": {
        "schema_version": {"const": 1},
        "config": {"type": "object", "required": ["backends", "batch_sizes", "new_tokens", "prompt_tokens", "repeats",
                                                  "warmup", "energy_source", "pue", "quality_tokens", "quality_window"]},
        "machine": {"type": "object", "required": ["cpu_model", "isa", "threads", "torch", "transformers", "pyengine",
                                                   "gpu", "gpu_driver"],
                    "properties": {"cpu_model": {"type": "string"}, "isa": {"type": "string"},
                                   "threads": {"type": "integer"}}},
        "energy": {"type": "object", "required": ["source", "estimated", "fallback_reason", "idle", "idle_note"]},
        "carbon": {"type": "object", "required": ["g_per_kwh", "pue", "source"],
                   "properties": {"g_per_kwh": NUM, "pue": NUM}},
        "results": {"type": "array", "minItems": 1, "items": RESULT},
        "quality": {"type": ["object", "null"], "required": ["reference", "backends", "tokens", "window"],
                    "properties": {"backends": {"type": "object", "additionalProperties": QUALITY_ENTRY}}},
        "tradeoffs": {"type": "object", "required": ["lines", "break_even_batch"]},
    },
}


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value, name):
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def check_schema(value, schema, where="$"):
    """A small JSON-schema subset (type, required, properties, additionalProperties, items, minItems,
    minimum, enum, const): returns a list of problems, empty when ``value`` conforms."""
    errors = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_type_ok(value, t) for t in types):
            return [f"{where}: expected {'/'.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if "const" in schema and value != schema["const"]:
        errors.append(f"{where}: expected {schema['const']!r}, got {value!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing key {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += check_schema(value[key], sub, f"{where}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, v in value.items():
                if key not in schema.get("properties", {}):
                    errors += check_schema(v, extra, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: {len(value)} items < {schema['minItems']}")
        if "items" in schema:
            for i, v in enumerate(value):
                errors += check_schema(v, schema["items"], f"{where}[{i}]")
    return errors


def _validate(report):
    problems = check_schema(report, SCHEMA)
    assert not problems, "\n".join(problems[:20])


def test_schema_checker_rejects_bad_reports():
    good = {"a": 1, "b": [{"c": "x"}]}
    schema = {"type": "object", "required": ["a", "b"],
              "properties": {"a": {"type": "integer", "minimum": 1},
                             "b": {"type": "array", "minItems": 1,
                                   "items": {"type": "object", "required": ["c"], "properties": {"c": {"enum": ["x"]}}}}}}
    assert check_schema(good, schema) == []
    assert check_schema({"a": 0, "b": []}, schema) == ["$.a: 0 < 1", "$.b: 0 items < 1"]
    assert check_schema({"a": True, "b": [{"c": "y"}]}, schema)[0].startswith("$.a: expected integer")
    assert check_schema({"b": [{}]}, schema) == ["$: missing key 'a'", "$.b[0]: missing key 'c'"]
    assert check_schema({"a": float("nan")}, {"properties": {"a": NUM}})


def test_strict_json_rejects_non_finite_tokens():
    assert strict_json('{"a": null, "b": [1.5]}') == {"a": None, "b": [1.5]}
    for token in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError, match="not strict JSON"):
            strict_json(f'{{"a": {token}}}')


def test_write_json_writes_non_finite_as_null(tmp_path):
    report = {"a": float("nan"), "b": [1.0, float("inf"), -float("inf")], "c": {2: {"d": float("nan"), "e": 3}},
              "f": (0.5, float("nan")), "g": tmp_path}
    path = tmp_path / "out" / "r.json"
    bench_report.write_json(report, path)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert strict_json(text) == {"a": None, "b": [1.0, None, None], "c": {"2": {"d": None, "e": 3}},
                                 "f": [0.5, None], "g": str(tmp_path)}


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" in data[-16:]


TINY_ARGS = ["--prompt-tokens", "8", "--new-tokens", "4", "--prefill-tokens", "24", "--repeats", "2",
             "--warmup", "1", "--quality-tokens", "96", "--quality-window", "32", "--no-progress", "--probe-mib", "16"]


@pytest.fixture(scope="module")
def e2e(tiny_models, tmp_path_factory):
    """One real run: hf-eager + torch, batch sizes 1 and 2, the estimate on this machine."""
    out = tmp_path_factory.mktemp("bench")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    stdout, stderr = io.StringIO(), io.StringIO()
    capture.setattr(sys, "stdout", stdout)
    capture.setattr(sys, "stderr", stderr)
    try:
        rc = main(["bench", "--model", str(tiny_models["llama"]), "--backends", "hf-eager,torch", "--batch-sizes", "1,2",
                   "--energy-source", "estimate", "--json", str(out / "r.json"), "--plot", str(out / "r.png"),
                   *TINY_ARGS])
    finally:
        capture.undo()
    return rc, stdout.getvalue(), stderr.getvalue(), out


def test_bench_end_to_end(e2e):
    rc, stdout, stderr, out = e2e
    assert rc == 0, stderr
    report = strict_json((out / "r.json").read_text())
    _validate(report)
    seen = {(r["backend"], r["batch_size"]) for r in report["results"]}
    assert seen == {(b, n) for b in ("hf-eager", "torch") for n in (1, 2)}
    watts_per_core = report["energy"]["constants"]["watts_per_core"]
    assert watts_per_core > 0 and report["energy"]["estimate_ratios"].startswith("every backend is charged")
    roof = report["roofline"]
    readings = roof["bandwidth_gb_s_readings"]
    assert list(readings) == ["start", "after torch", "after hf-eager", "end"]  # the reference backend runs first
    assert roof["bandwidth_gb_s"] == max(readings.values()) > 0
    assert roof["context"] == 8 + 4 // 2
    for r in report["results"]:
        assert r["energy"]["source"] == "estimate" and r["energy"]["estimated"] is True
        # every row says what the estimate is and why it is low confidence (was null for our backends)
        assert r["energy"]["confidence_reason"].startswith("estimate, not a measurement")
        assert r["energy"]["constants"]["watts_per_core"] == watts_per_core
        assert r["energy"]["method"] == "estimate: process CPU time (user+system) x W/core"
        # bytes per decoded token: fp32 weights shared by the batch, and the decode rate against reading them
        dr = r["decode_roofline"]
        assert dr["precision"] == "fp32"
        assert dr["roofline_tok_s"] == pytest.approx(roof["bandwidth_gb_s"] * 1e9 / dr["bytes_per_token"]["total"])
        assert dr["fraction"] == pytest.approx(r["summary"]["decode_tokens_per_s"]["median"] / dr["roofline_tok_s"])
        if r["backend"] != "hf-eager":
            assert r["vs_hf_eager"]["estimate_ratio_is_speed_ratio"] is True
        one = next(x for x in report["results"] if x["backend"] == r["backend"] and x["batch_size"] == 1)
        assert dr["bytes_per_token"]["weights"] * r["batch_size"] == one["decode_roofline"]["bytes_per_token"]["weights"]
        assert len(r["repeats"]) == 2
        for rep in r["repeats"]:
            assert rep["decode"]["tokens"] == r["batch_size"] * 3  # new_tokens - 1
            assert rep["prefill"]["tokens"] == r["batch_size"] * 24  # the long-prompt prefill
            assert rep["generate"]["tokens"] == r["batch_size"] * 4
            assert rep["decode"]["joules"] >= 0 and rep["prefill"]["joules"] >= 0
        assert r["summary"]["decode_tokens_per_s"]["median"] > 0
    assert report["energy"]["idle"] is None and "estimate" in report["energy"]["idle_note"]
    # prompts: every batch row has exactly --prompt-tokens ids, all different
    for b, rows in report["prompts"]["token_ids"].items():
        assert len(rows) == int(b) and all(len(ids) == 8 for ids in rows)
        assert len({tuple(ids) for ids in rows}) == len(rows)
    q = report["quality"]
    assert q["reference"] == "torch" and q["backends"]["torch"]["kl"] is None
    # HF eager and our torch backend compute the same model in fp32: the same distribution
    assert q["backends"]["hf-eager"]["kl"] < 1e-6
    assert q["backends"]["hf-eager"]["top1_agreement"] > 0.99
    assert abs(q["backends"]["hf-eager"]["ppl_delta_pct"]) < 1e-3
    # Greedy continuations of prompts cut from the corpus: the same model, the same 16 tokens.
    hf = q["backends"]["hf-eager"]
    assert hf["greedy_prompts"] >= 4 and hf["greedy_prompt_tokens"] == 12 and hf["greedy_new_tokens"] == 16
    assert hf["greedy_same_share"] == 1.0 and hf["greedy_tokens_before_difference"] == 16
    assert "greedy_same_share" not in q["backends"]["torch"]  # the reference
    assert "prompts cut from the corpus" in q["greedy"]
    assert report["tradeoffs"]["lines"] and "fused-int8" in report["tradeoffs"]["lines"][0]
    assert _is_png(out / "r.png")


def test_plot_without_timeline_shows_energy_against_quality_and_bytes(e2e, tmp_path, monkeypatch):
    """On the estimate there is no power timeline: the lower half plots decode J/token against quality
    lost and against bytes read per token, one point per backend and batch size."""
    import matplotlib.pyplot as plt

    report = strict_json((e2e[3] / "r.json").read_text())
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot(report, tmp_path / "p.png")
    axes = {ax.get_title(): ax for ax in figures[0].axes}
    assert set(axes) >= {"energy against quality lost", "energy against bytes moved per token"}
    assert not any("no power timeline" in t.get_text() for ax in figures[0].axes for t in ax.texts)
    points = axes["energy against bytes moved per token"].collections
    assert len(points) == len(report["results"])
    bytes_axis = sorted(float(c.get_offsets()[0][0]) for c in points)
    expected = sorted(r["decode_roofline"]["bytes_per_token"]["total"] / 1e6 for r in report["results"])
    assert bytes_axis == pytest.approx(expected)
    assert len(axes["energy against quality lost"].collections) == len(report["results"])


def test_bench_terminal_table(e2e):
    rc, stdout, stderr, _ = e2e
    assert rc == 0
    for word in ("backend", "decode tok/s", "decode J/tok", "gCO2e/1k tok", "speedup", "top-1", "greedy", "hf-eager",
                 "torch", "greedy: share of"):
        assert word in stdout
    assert "~" in stdout and "estimate: process CPU time x W/core, not a measurement" in stdout
    assert "ESTIMATE RATIOS ARE SPEED RATIOS" in stdout and "W/core:" in stdout
    assert "MB/tok" in stdout and "of roofline" in stdout and "prefill x" in stdout
    assert "energy source: estimate" in stdout and "fallback:" in stdout
    assert "idle power: skipped" in stdout
    assert "PUE 1" in stdout and "machine:" in stdout


class _NvmlLike:
    """A constant-power meter that calls itself nvml, with a short minimum window: exercises the
    idle baseline, active energy, the timeline and the repeat-inside-one-window path."""

    @staticmethod
    def make(cfg):
        from pyengine.energy import ConstantPowerMeter

        meter = ConstantPowerMeter({"gpu": 40.0}, sample_interval_s=0.01, min_window_s=5.0)
        meter.name = "nvml"
        meter.repeats_for = lambda seconds: 3  # as if every run were shorter than the minimum window
        return meter


def test_bench_measured_source_idle_timeline_and_min_window(tiny_models, tmp_path, monkeypatch, capsys):
    import pyengine.energy

    monkeypatch.setattr(bench_run, "make_bench_meter", _NvmlLike.make)
    events = []
    measure_idle, load = pyengine.energy.measure_idle, EngineRunner.__init__
    monkeypatch.setattr(pyengine.energy, "measure_idle",
                        lambda *a, **kw: events.append(("idle", kw.get("repeats"))) or measure_idle(*a, **kw))
    monkeypatch.setattr(EngineRunner, "__init__",
                        lambda self, name, *a, **kw: events.append(("load", name)) or load(self, name, *a, **kw))
    rc = main(["bench", "--model", str(tiny_models["gpt2"]), "--backends", "torch", "--idle-seconds", "0.1",
               "--idle-repeats", "2", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
               "--no-quality", *TINY_ARGS])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = strict_json((tmp_path / "r.json").read_text())
    _validate(report)
    assert report["quality"] is None
    # idle after the model is loaded, repeated, and again at the end
    assert events == [("load", "torch"), ("idle", 2), ("idle", 2)]
    for key in ("idle", "idle_end"):
        assert report["energy"][key]["total_watts"] == pytest.approx(40.0, rel=0.05)
        assert len(report["energy"][key]["window_watts"]) == 2 and report["energy"][key]["spread_watts"] >= 0
    assert abs(report["energy"]["idle_drift"]) < 0.05 and "measured with torch loaded" in report["energy"]["idle_note"]
    r = report["results"][0]
    rep = r["repeats"][0]
    assert r["energy"]["estimated"] is False and r["energy"]["source"] == "nvml"
    assert rep["runs_per_window"] == 3 and "one window" in rep["energy_method"]
    assert rep["decode"]["active_joules"] is not None
    assert rep["timeline"]["power"]["gpu"] and rep["timeline"]["phases"]
    # constant power: each phase is charged watts x its own seconds, the rest of the window is overhead
    for phase in ("prefill", "decode"):
        assert rep[phase]["joules"] == pytest.approx(40.0 * rep[phase]["seconds"], rel=1e-6)
    assert rep["overhead"]["seconds"] > 0 and rep["overhead"]["joules"] == pytest.approx(
        40.0 * rep["overhead"]["seconds"], rel=1e-6)
    assert "~" not in captured.out.split("\n\n")[0]
    assert "idle power: 40" in captured.out and "idle power at the end: 40" in captured.out
    assert _is_png(tmp_path / "r.png")


# ---- prompts -------------------------------------------------------------------------------------


def test_prompts_have_exact_token_counts(tiny_models):
    from pyengine.load.tokenizer import Tokenizer

    tok = Tokenizer.from_folder(tiny_models["qwen2"])
    for n, b in ((1, 1), (7, 3), (50, 4)):
        rows = build_prompts(tok, n, b)
        assert len(rows) == b and len({tuple(ids) for _, ids in rows}) == b
        for text, ids in rows:
            assert tok.encode(text) == ids and len(ids) == n
    assert build_prompts(tok, 9, 2) == build_prompts(tok, 9, 2)  # deterministic


# ---- quality maths -------------------------------------------------------------------------------


def test_perplexity_of_uniform_is_vocab_size():
    for vocab in (2, 17, 384):
        logits = torch.zeros(10, vocab)
        targets = torch.randint(0, vocab, (10,))
        assert quality.perplexity(logits, targets) == pytest.approx(vocab, rel=1e-12)


def test_perplexity_hand_computed():
    # two positions: p(target) = 0.5 then 0.25 -> ppl = exp(-(ln .5 + ln .25) / 2) = sqrt(8)
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0 + 1e-30], [0.25, 0.25, 0.5]]))
    assert quality.perplexity(logits, torch.tensor([0, 1])) == pytest.approx(math.sqrt(8), rel=1e-9)


def test_kl_identical_is_zero_and_hand_computed():
    x = torch.randn(5, 11)
    assert quality.kl_divergence(x, x) == 0.0
    assert quality.kl_divergence(x, x + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    p, q = torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert quality.kl_divergence(p.log(), q.log()) == pytest.approx(expected, rel=1e-9)
    # KL(ref || cand) is not symmetric: the reverse is a different number
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert quality.kl_divergence(q.log(), p.log()) == pytest.approx(reverse, rel=1e-9)


def test_top1_agreement():
    ref = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    cand = torch.tensor([[0.0, 5.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert quality.top1_agreement(ref, cand) == 0.5
    assert quality.top1_agreement(ref, ref) == 1.0


def test_greedy_prompts_and_agreement():
    ids = list(range(100))
    prompts = quality.greedy_prompts(ids, 4, 10)
    assert prompts == [list(range(s, s + 10)) for s in (0, 30, 60, 90)]  # evenly spaced, the last at the end
    assert len(quality.greedy_prompts(ids, 50, 10)) == 10  # no more than the corpus holds
    assert quality.greedy_prompts(ids[:5], 4, 10) == []
    with pytest.raises(ValueError, match="count >= 1"):
        quality.greedy_prompts(ids, 0, 10)
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    out = quality.greedy_agreement(ref, [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]])
    assert out == {"greedy_prompts": 3, "greedy_same_share": 1 / 3, "greedy_tokens_before_difference": (4 + 2 + 0) / 3}
    assert quality.greedy_agreement(ref, ref)["greedy_same_share"] == 1.0
    stopped_early = [[1, 2, 3], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert quality.greedy_agreement(ref, stopped_early)["greedy_same_share"] == 2 / 3
    with pytest.raises(ValueError, match="one continuation per reference prompt"):
        quality.greedy_agreement(ref, ref[:2])


def test_windows_and_evaluate():
    ids = list(range(10))
    assert quality.windows(ids, 10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert quality.windows(ids, 9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a 1-token tail predicts nothing
    torch.manual_seed(0)
    table = torch.randn(10, 10)
    res, kept = quality.evaluate(lambda w: table[w], quality.windows(ids, 10, 4), keep=True)
    assert res.positions == 3 + 3 + 1 and res.windows == 3 and res.kl is None
    same, _ = quality.evaluate(lambda w: table[w], quality.windows(ids, 10, 4), reference=kept, reference_name="x")
    assert same.kl == 0.0 and same.top1_agreement == 1.0 and same.perplexity == res.perplexity
    uniform, _ = quality.evaluate(lambda w: torch.zeros(len(w), 10), quality.windows(ids, 10, 4))
    assert uniform.perplexity == pytest.approx(10.0)


# ---- argument errors -----------------------------------------------------------------------------


def _rc(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own type errors exit 2 after printing usage
        return e.code


@pytest.mark.parametrize("extra, message", [
    (["--backends", "hf-eager,warp-drive"], "unknown backend 'warp-drive'"),
    (["--batch-sizes", "0"], "batch-sizes: 0 is not a positive integer"),
    (["--batch-sizes", "1,-4"], "batch-sizes: -4 is not a positive integer"),
    (["--batch-sizes", "1.5"], "'1.5' is not an integer"),
    (["--batch-sizes", "two"], "'two' is not an integer"),
    (["--new-tokens", "0"], "--new-tokens must be at least 1"),
    (["--new-tokens", "many"], "invalid int value"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--corpus", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt does not exist"),
    (["--energy-source", "wattmeter"], "unknown energy source 'wattmeter'"),
    (["--pue", "0.5"], "--pue is facility energy / IT energy and must be >= 1.0"),
    (["--grid-intensity", "ATLANTIS"], "unknown grid region"),
    (["--quality-window", "1"], "--quality-window must be at least 2"),
    (["--backends", "torch", "--int8-method", "gptq"], "apply to the fused-int8 backend"),
    (["--backends", "fused-int8", "--int8-weights", "/nonexistent/int8.safetensors"],
     "/nonexistent/int8.safetensors does not exist"),
    (["--int8-method", "awq"], "invalid choice: 'awq'"),
])
def test_bad_arguments_exit_nonzero(tiny_models, capsys, extra, message):
    rc = _rc(["bench", "--model", str(tiny_models["llama"]), "--no-progress", *extra])
    captured = capsys.readouterr()
    assert rc != 0
    assert message in captured.err
    assert captured.out == ""  # failed before any work


def test_unloadable_model_exits_nonzero(tmp_path, capsys):
    assert _rc(["bench", "--model", str(tmp_path / "missing"), "--no-progress"]) != 0
    assert "no such model folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _rc(["bench", "--model", str(empty), "--no-progress"]) != 0
    assert "config.json" in capsys.readouterr().err


def test_context_too_small_exits_nonzero(tiny_models, capsys):
    assert _rc(["bench", "--model", str(tiny_models["llama"]), "--prompt-tokens", "200", "--new-tokens", "100",
                "--no-progress"]) != 0
    assert "exceeds the model's context" in capsys.readouterr().err


def test_bench_int8_weights_file_is_used_and_named(tiny_models, tmp_path, capsys, monkeypatch):
    import pyengine

    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path / "cache"))  # the tiny model's GPTQ entry

    saved = pyengine.load(tiny_models["llama"], backend="fused-int8", int8_method="gptq",
                          progress=False).save_int8(tmp_path / "gptq.safetensors")
    rc = main(["bench", "--model", str(tiny_models["llama"]), "--backends", "fused,fused-int8",
               "--int8-weights", str(saved), "--energy-source", "estimate", "--json", str(tmp_path / "r.json"),
               *TINY_ARGS])
    out = capsys.readouterr()
    assert rc == 0, out.err
    report = strict_json((tmp_path / "r.json").read_text())
    _validate(report)
    assert report["config"]["int8_weights"] == str(saved)
    methods = {r["backend"]: r.get("int8_method") for r in report["results"]}
    assert methods == {"fused": None, "fused-int8": "gptq"}  # read from the file, not assumed
    assert "fused-int8 (gptq)" in out.out


# ---- the default model ---------------------------------------------------------------------------


@pytest.mark.default_model
def test_bench_default_model(tmp_path, capsys):
    pytest.importorskip("pyengine.load.default_model", reason="pyengine.load.default_model is not in this build")
    rc = main(["bench", "--model", "default", "--backends", "hf-eager,torch", "--prompt-tokens", "8",
               "--new-tokens", "4", "--prefill-tokens", "16", "--repeats", "1", "--warmup", "0",
               "--quality-tokens", "64", "--quality-window", "32", "--energy-source", "estimate", "--no-progress",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    report = strict_json((tmp_path / "r.json").read_text())
    _validate(report)
    assert report["quality"]["backends"]["hf-eager"]["kl"] < 1e-4


# ---- measure(): phase accounting with a scripted runner ------------------------------------------


class _ScriptedRunner:
    """Sleeps through fixed phase lengths; `hf=True` reports like HFRunner (decode = the whole generate)."""

    def __init__(self, meter, hf, gap=0.0):
        self.meter, self.hf, self.gap = meter, hf, gap

    def _phase(self, seconds, meter, name):
        import time

        w = meter.start(name) if meter else None
        time.sleep(seconds)
        return (seconds, meter.stop(w) if meter else None)

    def run_prefill(self, rows, meter):
        return measure.Phases(prefill=self._phase(0.02, meter, "prefill"), decode=None)

    def run_generate(self, rows, new_tokens, meter):
        import time

        time.sleep(self.gap)  # Python around the call: inside a repeated-run window, outside every phase
        p = self._phase(0.02, meter, "prefill")
        if self.hf:
            g = self._phase(0.08, meter, "generate")  # = prefill 0.02 + decode 0.06
            return measure.Phases(prefill=p, decode=(g[0] - p[0], g[1]), decode_is_total=True)
        return measure.Phases(prefill=p, decode=self._phase(0.06, meter, "decode"))


@pytest.mark.parametrize("hf", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_measure_splits_phases_at_constant_power(hf, k):
    from types import SimpleNamespace

    from pyengine.energy import ConstantPowerMeter, IdlePower

    meter = ConstantPowerMeter({"gpu": 100.0}, sample_interval_s=0.005)
    idle = IdlePower({"gpu": 25.0}, 1.0, "constant")
    rows = [("a", [1, 2, 3, 4]), ("b", [5, 6, 7, 8])]
    cfg = SimpleNamespace(new_tokens=5)
    try:
        m = measure.measure(_ScriptedRunner(meter, hf), "generate", rows, cfg, meter, idle, runs_per_window=k)
    finally:
        meter.close()
    assert m["runs_per_window"] == k
    assert m["prefill"]["tokens"] == 8 and m["decode"]["tokens"] == 8 and m["generate"]["tokens"] == 10
    # 100 W throughout: joules = 100 x seconds per phase (sleep overshoot and sampling make it approximate)
    assert m["prefill"]["joules"] == pytest.approx(100.0 * m["prefill"]["seconds"], rel=0.25)
    assert m["decode"]["joules"] == pytest.approx(100.0 * m["decode"]["seconds"], rel=0.25)
    assert m["decode"]["seconds"] == pytest.approx(0.06, rel=0.5)
    assert m["decode"]["active_joules"] == pytest.approx(m["decode"]["joules"] - 25.0 * m["decode"]["seconds"])
    assert m["energy"]["source"] == "constant" and m["energy"]["estimated"] is False
    assert m["timeline"]["phases"][0][0] == "prefill"


@pytest.mark.parametrize("hf", [False, True])
def test_repeated_run_window_charges_watts_times_phase_seconds(hf):
    """Inside one window over k runs, each phase gets the window's average watts x its own seconds;
    the gaps between runs (here 50 ms of sleep per run, and HF's prefill inside generate) are
    overhead, not charged to the phases in proportion to them."""
    from types import SimpleNamespace

    from pyengine.energy import ConstantPowerMeter

    meter = ConstantPowerMeter({"gpu": 100.0}, sample_interval_s=0.005)
    try:
        m = measure.measure(_ScriptedRunner(meter, hf, gap=0.05), "generate", [("a", [1, 2, 3])],
                          SimpleNamespace(new_tokens=4), meter, None, runs_per_window=3)
    finally:
        meter.close()
    for phase in ("prefill", "decode"):  # exact: 100 W throughout, trapezoid of a constant
        assert m[phase]["joules"] == pytest.approx(100.0 * m[phase]["seconds"], rel=1e-9)
    o = m["overhead"]
    assert o["average_watts"] == pytest.approx(100.0) and o["joules"] == pytest.approx(100.0 * o["seconds"], rel=1e-9)
    # the gap (and HF's second prefill, 20 ms) is overhead
    assert o["seconds"] == pytest.approx(0.05 + (0.02 if hf else 0.0), abs=0.03)
    assert "each phase charged the window's average watts" in m["energy_method"]


def test_active_energy_below_idle_is_flagged_not_silently_zero():
    from types import SimpleNamespace

    from pyengine.energy import ConstantPowerMeter, IdlePower

    meter = ConstantPowerMeter({"gpu": 20.0}, sample_interval_s=0.005)
    try:
        m = measure.measure(_ScriptedRunner(meter, False), "generate", [("a", [1, 2])], SimpleNamespace(new_tokens=3),
                          meter, IdlePower({"gpu": 50.0}, 1.0, "constant"))
    finally:
        meter.close()
    assert m["decode"]["active_joules"] == 0.0 and m["decode"]["active_clamped"] is True
    assert m["energy"]["confidence"] == "low"
    assert "idle subtraction clamped at 0 for prefill, decode" in m["energy"]["confidence_reason"]


# ---- the HF baseline -----------------------------------------------------------------------------


def test_hf_prefill_asks_for_the_last_position_only(tiny_models):
    runner = HFRunner(tiny_models["llama"], torch.device("cpu"))
    seen = []
    original = runner.model.forward

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append((kwargs.get("logits_to_keep"), tuple(out.logits.shape)))
        return out

    runner.model.forward = spy
    rows = [("a", [5, 6, 7, 8, 9]), ("b", [9, 8, 7, 6, 5])]
    runner.run_prefill(rows, None)
    assert seen[0][0] == 1 and seen[0][1][:2] == (2, 1)  # one position's logits per row, as pyengine
    seen.clear()
    runner.run_generate(rows, 2, None)
    assert seen[0][0] == 1 and seen[0][1][:2] == (2, 1)  # the separate prefill forward too
    assert runner.logits([5, 6, 7]).shape[0] == 3  # quality scoring still sees every position


def test_hf_in_the_checkpoint_dtype(tiny_models, tmp_path):
    import shutil

    folder = tmp_path / "bf16"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    assert bench_config.hf_native_backend(folder) == "hf-eager-bf16"
    assert bench_config.hf_native_backend(tiny_models["llama"]) is None  # fp32: the baseline is already its dtype
    runner = HFRunner(folder, torch.device("cpu"), "hf-eager-bf16")
    assert runner.dtype == torch.bfloat16 and next(runner.model.parameters()).dtype == torch.bfloat16
    assert HFRunner(folder, torch.device("cpu")).dtype == torch.float32  # hf-eager: fp32, ours


def test_grid_intensity_help_names_only_regions_in_the_table(capsys):
    import re

    from pyengine.energy.carbon import regions

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    named = re.search(r"grid region code \(([^)]*)\)", text).group(1).replace(" ", "").split(",")
    assert named and set(named) <= set(regions()), named


# ---- the int8 trade-off lines --------------------------------------------------------------------


def _fake_report(j_int8, j_fp32, idle=False, estimated=False):
    key = "decode_active_joules_per_token" if idle else "decode_joules_per_token"
    results = []
    for name, js in (("fused", j_fp32), ("fused-int8", j_int8)):
        for b, j in zip((1, 4, 16), js):
            results.append({"backend": name, "batch_size": b, "summary": {key: {"median": j}}})
    quality = {"backends": {"fused": {"perplexity": 10.0, "kl": 0.0, "top1_agreement": 1.0, "reference": "torch"},
                            "fused-int8": {"perplexity": 10.5, "kl": 0.01, "top1_agreement": 0.97,
                                           "reference": "torch"}}}
    return {"results": results, "energy": {"idle": {"total_watts": 1.0} if idle else None, "estimated": estimated},
            "config": {"batch_sizes": [1, 4, 16]}, "quality": quality}


def test_tradeoff_break_even_batch():

    t = bench_report.tradeoffs(_fake_report([2.0, 0.9, 0.5], [1.0, 1.0, 1.0], idle=True))
    assert t["fp32"] == "fused" and t["break_even_batch"] == 4
    assert t["basis"] == "decode_active_joules_per_token"
    b16 = t["by_batch"][2]
    assert b16["energy_saved_pct"] == pytest.approx(50.0) and b16["ppl_delta"] == pytest.approx(0.5)
    assert b16["ppl_delta_pct"] == pytest.approx(5.0) and b16["top1_agreement"] == 0.97
    assert "batch 1: fused-int8 vs fused" in t["lines"][0] and "costs 100.0%" in t["lines"][0]
    assert "saves 50.0%" in t["lines"][2] and "ppl +0.500" in t["lines"][2]
    assert t["lines"][-1].endswith("(fused): 4")
    never = bench_report.tradeoffs(_fake_report([2.0, 1.5, 1.1], [1.0, 1.0, 1.0]))
    assert never["break_even_batch"] is None
    assert never["lines"][-1] == "int8 did not save energy at any measured batch size"
    assert not any(line.startswith("~") for line in t["lines"] + never["lines"])  # measured: no estimate mark


def test_tradeoff_lines_on_the_estimate_say_they_are_speed_ratios():
    t = bench_report.tradeoffs(_fake_report([2.0, 0.9, 0.5], [1.0, 1.0, 1.0], estimated=True))
    assert t["estimated"] is True
    assert all(line.startswith("~ ") for line in t["lines"])  # every derived line carries the mark
    assert "SPEED ratio" in t["lines"][-1] and "same watts per busy core" in t["lines"][-1]


def test_rows_are_charged_their_backends_stored_width():
    from pyengine.bench.config import precision_of

    assert precision_of({"backend": "fused-int8", "dtype": "float32"}) == "int8"
    assert precision_of({"backend": "fused-bf16", "dtype": "float32"}) == "bf16"
    assert precision_of({"backend": "fused", "dtype": "float32"}) == "fp32"
    assert precision_of({"backend": "hf-eager-bf16", "dtype": "bfloat16"}) == "bf16"
