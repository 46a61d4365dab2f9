"""`pyengine bench-serve`, shortened, on a tiny model: the sweep, the pairs, the overload against a
real `pyengine serve` subprocess, and the JSON + PNG it writes."""
import json

from pyengine import cli


def test_bench_serve_writes_results(tiny_models, tmp_path):
    argv = ["bench-serve", "--model", str(tiny_models["llama"]), "--concurrency", "1,3", "--new-tokens", "8",
            "--serialized", "1", "--repeats", "2", "--overload", "8", "--queue-limit", "2",
            "--overload-tokens", "4", "--kv-budget", str(64 << 20), "--machine", "test", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "serve-test.json").read_text())
    assert (tmp_path / "serve-test.png").stat().st_size > 0
    assert [lv["concurrency"] for lv in result["levels"]] == [1, 3] and len(result["pairs"]) == 2
    for lv in result["levels"]:
        assert lv["tokens"] == 8 * lv["concurrency"] and lv["ttft_p50_s"] > 0 and lv["tbt_p99_s"] >= lv["tbt_p50_s"]
        assert len(lv["joules_per_token"]) == lv["concurrency"]
    assert set(result["targets"]) >= {"throughput_vs_list", "tbt_p99_over_same_level_batch_step",
                                      "requests_joules_over_meter"}
    overload = result["overload"]
    assert overload["full_answers"] + overload["refused_429"] == 8 and overload["other"] == 0
    assert overload["full_answers"] >= 2 and overload["server_alive"]
    assert overload["health_ok"] == overload["health_polls"]
