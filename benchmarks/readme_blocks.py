"""Generated README blocks: a benchmark renders its results JSON into markdown between two marker comments."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def replace_block(block: str, start: str, end: str, path: Path = README) -> None:
    """Put `block` (which begins with `start` and ends with `end`) in place of the `start` ... `end` part of `path`."""
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} block")
    head, rest = text.split(start, 1)
    path.write_text(head + block + rest.split(end, 1)[1])
