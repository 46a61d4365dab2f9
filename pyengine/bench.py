"""`pyengine bench`: HF transformers eager against pyengine's backends, speed and energy per token."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="compare HF eager with pyengine backends (speed, energy)")
    p.set_defaults(func=run)


def run(args) -> int:
    raise RuntimeError("pyengine bench is not implemented yet")
