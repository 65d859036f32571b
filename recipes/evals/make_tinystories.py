"""Writes the example task files beside this script from the shipped TinyStories text (shared/data).

    python recipes/evals/make_tinystories.py [--data DIR]    (DIR: $QUANTFAB_DATA, else ../shared/data)

Items come from the second half of tinystories-valid-head.txt; the recipes calibrate on its first windows.

- tinystories-names.jsonl (multiple_choice): who the story is about. The context is a paragraph's opening
  sentences; the choices are the next sentence as written and three copies with its one character name
  replaced by another name from the text. A name is a capitalised word met mid-sentence at least
  ``MIN_NAME_COUNT`` times and never written in lower case (less three that pass and name nobody). Only sentences naming someone the context named
  qualify, so the model must carry the name over; the copies differ from the truth in the name alone.
- tinystories-continue.jsonl (continuation): a paragraph's first sentence as a prompt, for greedy continuations.

The output is a function of the text and ``SEED``: tests/test_task_evals.py builds it again and compares bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SENTENCE_END = re.compile(r'(?<=[.!?])\s+(?=["A-Z])')
CAPITALISED = re.compile(r"\b[A-Z][a-z]+\b")
NOT_NAMES = {"Christmas", "God", "Hi"}  # pass the rule below, but name no character
SEED, DISTRACTORS, QUESTIONS, PROMPTS, MIN_NAME_COUNT = 0, 3, 200, 64, 8


def paragraphs(text: str) -> list[list[str]]:
    """Each paragraph as its sentences."""
    return [[s for s in SENTENCE_END.split(b.strip()) if s] for b in text.split("\n\n") if b.strip()]


def character_names(text: str) -> list[str]:
    """Capitalised words met mid-sentence at least MIN_NAME_COUNT times and never in lower case."""
    mid = Counter(m.group() for p in paragraphs(text) for s in p for m in CAPITALISED.finditer(s) if m.start() > 1)
    lower = set(re.findall(r"\b[a-z]+\b", text))
    return sorted(w for w, n in mid.items() if n >= MIN_NAME_COUNT and w.lower() not in lower and w not in NOT_NAMES)


def name_items(paras: list[list[str]], names: list[str], rng: random.Random) -> list[dict]:
    items = []
    for p in paras:
        for k in range(1, len(p)):
            context, sentence = " ".join(p[:k]), p[k]
            named = sorted(set(CAPITALISED.findall(sentence)) & set(names))
            if len(named) != 1 or not re.search(rf"\b{named[0]}\b", context):
                continue
            others = [n for n in names if not re.search(rf"\b{n}\b", context + " " + sentence)]
            choices = [sentence] + [re.sub(rf"\b{named[0]}\b", n, sentence) for n in rng.sample(others, DISTRACTORS)]
            rng.shuffle(choices)
            items.append({"context": context, "choices": choices, "gold": choices.index(sentence)})
            break
        if len(items) == QUESTIONS:
            break
    return items


def continuation_items(paras: list[list[str]]) -> list[dict]:
    """The last paragraphs' first sentences (the questions come from the first ones)."""
    prompts = [p[0] for p in paras if len(p) >= 2 and len(p[0]) >= 30]
    return [{"prompt": s} for s in prompts[-PROMPTS:]]


def write(path: Path, items: list[dict]) -> None:
    path.write_text("".join(json.dumps(it, sort_keys=True) + "\n" for it in items), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("QUANTFAB_DATA") or str(HERE.parents[2] / "shared" / "data"))
    parser.add_argument("--out", default=str(HERE))
    args = parser.parse_args()
    text = (Path(args.data) / "tinystories-valid-head.txt").read_text(encoding="utf-8")
    second_half = paragraphs(text[len(text) // 2:])[1:]  # the first may start mid-paragraph
    write(Path(args.out) / "tinystories-names.jsonl", name_items(second_half, character_names(text), random.Random(SEED)))
    write(Path(args.out) / "tinystories-continue.jsonl", continuation_items(second_half))


if __name__ == "__main__":
    main()
