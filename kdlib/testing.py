"""Synthetic intents for the tests, demos and multi-process runs: keyword data a tiny model
(:func:`kdlib.models.make_tiny_model`) learns in a few steps. Nothing on the production path imports it.
"""

from __future__ import annotations

import random

SYNTHETIC_KEYWORDS = {
    "alarm": ["alarm", "wake me", "set timer"],
    "balance": ["balance", "money left", "account total"],
    "music": ["music", "play song", "volume up"],
    "weather": ["weather", "rain today", "sunny"],
}
SYNTHETIC_FILLERS = ["please", "can you", "now", "for me", "quick", "thanks", "hey", "i need"]


def synthetic_intents(n_per_label: int, seed: int) -> tuple[list[str], list[str]]:
    """(texts, labels): each text one intent keyword among a few filler words, reproducible by seed."""
    rng = random.Random(seed)
    texts, labels = [], []
    for label, keywords in SYNTHETIC_KEYWORDS.items():
        for _ in range(n_per_label):
            words = [rng.choice(keywords), *rng.sample(SYNTHETIC_FILLERS, rng.randint(0, 3))]
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(label)
    return texts, labels
