"""Progress lines for long work, and the words (an h:mm:ss clock, counted nouns) they, the
commands and the report print."""
from __future__ import annotations

import sys
import time


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def plural(n, word: str) -> str:
    """ "1 run", "2 runs"; `n` may come as text (a logged tag)."""
    return f"{n} {word}{'' if str(n) in ('1', '1.0') else 's'}"


def join_words(words: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    words = list(words)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class Progress:
    """Prints a line at most every `every` seconds while long work runs: where it is,
    throughput (when told how many images were seen) and an estimate of the time left."""

    def __init__(self, label: str, total: int, every: float = 10.0, stream=sys.stderr, unit: str = "batch"):
        self.label, self.total, self.every, self.stream, self.unit = label, total, every, stream, unit
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, seen: int = 0) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done == self.total:
            return
        self.last = now
        rate = f", {seen / (now - self.start):.0f} img/s" if seen else ""
        left = (now - self.start) / done * (self.total - done)
        print(f"  {self.label}: {self.unit} {done}/{self.total}{rate}, ~{left:.0f}s left",
              file=self.stream, flush=True)
