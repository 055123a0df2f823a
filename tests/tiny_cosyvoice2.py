"""The CosyVoice 2 model builder under its earlier name (the GPU kit runs `python -m tests.tiny_cosyvoice2`).

Usage: python -m tests.tiny_cosyvoice2 --repo /path/to/CosyVoice --out DIR [--size 0.5b]; see tests/tiny_cosyvoice.py.
"""

from __future__ import annotations

from .tiny_cosyvoice import build, main

__all__ = ["build", "main"]

if __name__ == "__main__":
    main(default_version=2)
