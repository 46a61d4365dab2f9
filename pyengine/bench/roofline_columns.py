"""The roofline columns: read bandwidth probed during the run, bytes read per decoded token, and each
row's decode rate as a fraction of reading those bytes at that bandwidth (CPU)."""
from __future__ import annotations

from pyengine.bench.config import precision_of
from pyengine.bench.measure import median_of, ratio_of


def read_bandwidth(cfg) -> float | None:
    """Read bandwidth (GB/s, best of 10) for the roofline columns; None when --probe-mib is 0."""
    if not cfg.probe_mib:
        return None
    from pyengine.bench.roofline import read_bandwidth_gbs

    return read_bandwidth_gbs(repeats=10, nbytes=cfg.probe_mib << 20)


def roofline_of(cfg, mconfig, bandwidth) -> dict | None:
    """The run's bandwidth readings and the average KV length of a decode step (prompt + half the new tokens)."""
    readings = [g for g in (bandwidth or {}).values() if g]
    if not readings:
        return None
    return {"bandwidth_gb_s": max(readings), "bandwidth_gb_s_start": bandwidth.get("start"),
            "bandwidth_gb_s_end": bandwidth.get("end"), "bandwidth_gb_s_readings": dict(bandwidth),
            "probe_mib": cfg.probe_mib,
            "context": cfg.prompt_tokens + cfg.new_tokens // 2,
            "note": "read bandwidth: best of 10 reads of the probe at the start, after each backend and at the end of "
                    "the run, the highest used (a shared machine slows a probe, never speeds it up); bytes per decoded token: the weights at their stored width once per step shared by the "
                    "batch, plus each sequence's KV cache at the average context"}


def decode_bytes(row, mconfig, roof) -> dict | None:
    from pyengine.bench.roofline import bytes_per_token

    if roof is None:
        return None
    per = bytes_per_token(mconfig, precision_of(row), roof["context"], row["batch_size"])
    tok_s = roof["bandwidth_gb_s"] * 1e9 / per["total"]
    measured = median_of(row["summary"], "decode_tokens_per_s")
    return {"precision": precision_of(row), "bytes_per_token": per, "roofline_tok_s": tok_s,
            "fraction": ratio_of(measured, tok_s)}
