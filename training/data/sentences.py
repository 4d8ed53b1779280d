"""Sentences for the synthetic corpus: seeded English compositions, and other languages' from ``sentences.json``."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

__all__ = ["SENTENCES", "sentences"]

SENTENCES = Path(__file__).with_name("sentences.json")


_SUBJECTS = ["the old man", "a young girl", "my neighbour", "the doctor", "our teacher", "the pilot", "a tired farmer",
             "the children", "her brother", "the musician", "a quiet student", "the baker", "his mother", "the captain"]
_VERBS = ["carried", "painted", "found", "opened", "watched", "bought", "cleaned", "forgot", "repaired", "described",
          "borrowed", "counted", "followed", "remembered"]
_OBJECTS = ["a heavy wooden box", "the red bicycle", "seven small apples", "an empty glass", "the broken window",
            "a long letter", "the blue umbrella", "twelve silver coins", "the kitchen door", "a strange old map",
            "the morning paper", "three green bottles"]
_TAILS = ["before the rain started", "near the railway station", "on a cold winter evening", "without saying a word",
          "while everyone was sleeping", "at the end of the long road", "in the middle of the market",
          "after the concert", "just after sunrise", "because nobody else would"]
_FIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "She sells sea shells by the sea shore every summer.",
    "Numbers like four hundred and twenty seven are hard to say quickly.",
    "Is it going to rain tomorrow, or will the sun finally come out?",
    "The museum opens at nine o'clock and closes at half past five.",
    "Thank you very much for your help, I really appreciate it.",
    "My password is seven three nine one, please do not tell anyone.",
]


@cache
def _sentence_table() -> dict[str, list[str]]:
    table = json.loads(SENTENCES.read_text(encoding="utf-8"))
    return {k: v for k, v in table.items() if not k.startswith("_")}


def sentences(n: int, seed: int, language: str = "en") -> list[str]:
    """``n`` distinct varied sentences in ``language``, seeded.

    English: fixed sentences first, then random compositions. Other languages: one to three of
    the language's sentences from ``sentences.json`` in random order.

    Raises:
        ValueError: ``language`` has no sentences, or too few to make ``n`` distinct ones.
    """
    rng = random.Random(seed)
    if language == "en":
        out = list(_FIXED[: min(n, len(_FIXED))])
        while len(out) < n:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            if rng.random() < 0.3:
                s += f", and then {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"]))
        return out
    table = _sentence_table()
    if language not in table:
        raise ValueError(f"language {language!r} has no sentences in {SENTENCES} (have: en, {', '.join(sorted(table))})")
    base = table[language]
    out_set: dict[str, None] = {s: None for s in base[:n]}
    for _ in range(100 * n):
        if len(out_set) >= n:
            break
        out_set.setdefault(" ".join(rng.sample(base, rng.choice((2, 2, 3)))), None)
    if len(out_set) < n:
        raise ValueError(f"n={n}: language {language!r} has only {len(base)} sentences, too few for {n} distinct ones")
    return list(out_set)[:n]
