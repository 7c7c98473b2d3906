"""Generate arlm's bundled example datasets (deterministic; nothing is downloaded).

    python -m arlm.data.bundled.make          # rewrites the files beside this module

  chat_train.jsonl / chat_test.jsonl
      conversational {"messages": [...]} rows that teach one recognisable reply format: every
      assistant turn is "Ahoy! <a plain one-sentence answer> Arr!" (`FORMAT_REGEX`). A fifth of the
      training rows have two user/assistant turns. Test questions never occur in training.
  preferences_train.jsonl / preferences_test.jsonl
      conversational preference rows over the same questions: chosen = the formatted reply,
      rejected = the same answer without the format.
  text_train.txt / text_test.txt
      one invented almanac entry per line (places, rivers, markets), for continued pretraining.

The questions are templated from the small word lists below (arithmetic, opposites, colours,
capitals, animal sounds, word lengths); the answers are right.
"""

from __future__ import annotations

import json
import os
import random
import re

from arlm.data.bundled import FORMAT_REGEX, HERE

SEED = 20261207

OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("early", "late"), ("light", "dark"), ("open", "closed"), ("full", "empty"), ("young", "old"),
             ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
             ("thick", "thin"), ("high", "low"), ("near", "far"), ("clean", "dirty"), ("long", "short"),
             ("heavy", "light"), ("inside", "outside"), ("first", "last"), ("true", "false"), ("left", "right")]
COLOURS = [("grass", "green"), ("the sky on a clear day", "blue"), ("snow", "white"), ("coal", "black"),
           ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("an orange", "orange"), ("a lemon", "yellow"),
           ("milk", "white"), ("a carrot", "orange"), ("a strawberry", "red"), ("a crow", "black"),
           ("the sea", "blue"), ("a pumpkin", "orange"), ("chocolate", "brown"), ("a lime", "green")]
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Poland", "Warsaw"), ("Portugal", "Lisbon"),
            ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
            ("Chile", "Santiago"), ("Cuba", "Havana"), ("Thailand", "Bangkok"), ("Russia", "Moscow"),
            ("China", "Beijing"), ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires")]
SOUNDS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
          ("pig", "oink"), ("owl", "hoot"), ("lion", "roar"), ("snake", "hiss"), ("horse", "neigh"),
          ("frog", "ribbit"), ("bee", "buzz"), ("mouse", "squeak"), ("rooster", "cock-a-doodle-doo")]
WORDS = ["apple", "river", "garden", "pencil", "window", "mountain", "castle", "dragon", "anchor", "harbor",
         "parrot", "lantern", "island", "compass", "treasure", "sail", "rope", "ocean", "cloud", "bridge"]


def questions() -> list[tuple[str, str]]:
    """(question, plain one-sentence answer) pairs, every kind, in a fixed order."""
    qa = []
    for a in range(2, 13):
        for b in (2, 3, 5, 7):
            qa.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
            if a > b:
                qa.append((f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."))
            if a <= 9 and b <= 5:
                qa.append((f"What is {a} times {b}?", f"{a} times {b} is {a * b}."))
    for w, o in OPPOSITES:
        qa.append((f"What is the opposite of {w}?", f"The opposite of {w} is {o}."))
    for thing, colour in COLOURS:
        qa.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for country, capital in CAPITALS:
        qa.append((f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for animal, sound in SOUNDS:
        qa.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for w in WORDS:
        qa.append((f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters."))
    return qa


def formatted(answer: str) -> str:
    return f"Ahoy! {answer} Arr!"


def _split(qa: list[tuple[str, str]], n_test: int, rng: random.Random) -> tuple[list, list]:
    order = list(range(len(qa)))
    rng.shuffle(order)
    test = sorted(order[:n_test])
    train = sorted(order[n_test:])
    return [qa[i] for i in train], [qa[i] for i in test]


def chat_rows(qa: list[tuple[str, str]], rng: random.Random, two_turn_share: float) -> list[dict]:
    rows = []
    pool = list(qa)
    rng.shuffle(pool)
    i = 0
    while i < len(pool):
        if rng.random() < two_turn_share and i + 1 < len(pool):
            (q1, a1), (q2, a2) = pool[i], pool[i + 1]
            rows.append({"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": formatted(a1)},
                                      {"role": "user", "content": q2}, {"role": "assistant", "content": formatted(a2)}]})
            i += 2
        else:
            q, a = pool[i]
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": formatted(a)}]})
            i += 1
    return rows


def preference_rows(qa: list[tuple[str, str]]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": formatted(a)}],
             "rejected": [{"role": "assistant", "content": a}]} for q, a in qa]


PLACES = ["Kestrel Hollow", "Amberford", "Wexmoor", "Thistlecombe", "Orrin Vale", "Marrowby", "Fenwick Cross",
          "Larkspur", "Dunmere", "Ashgrove", "Brackenridge", "Coldwater", "Elderwick", "Glimmerdale", "Hartsfell",
          "Ivybridge", "Juniper Bay", "Kingsmere", "Lowbarrow", "Mistlecombe", "Northwold", "Oakhaven",
          "Pebblebrook", "Quillon", "Ravensworth", "Saltmarsh", "Tidewell", "Umberlee", "Violet Hill", "Willowmere"]
RIVERS = ["Aun", "Brise", "Cael", "Dorn", "Esk", "Fal", "Glen", "Hask", "Isen", "Lune", "Mere", "Tarn"]
DAYS = ["Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays"]
GOODS = ["wool", "cheese", "salt", "apples", "timber", "honey", "pottery", "linen", "barley", "fish"]
METALS = ["bronze", "iron", "brass", "copper", "silver"]


def almanac(rng: random.Random, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        place, river = rng.choice(PLACES), rng.choice(RIVERS)
        people = rng.randrange(80, 4000)
        lines.append(f"{place} is a village of {people} people on the river {river}; its market opens on "
                     f"{rng.choice(DAYS)}, where they trade {rng.choice(GOODS)} and {rng.choice(GOODS)}, "
                     f"and its bells are cast from {rng.choice(METALS)}.")
    return lines


def _write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(directory: str = HERE) -> list[str]:
    """Write every bundled file into `directory`; returns their paths."""
    rng = random.Random(SEED)
    train_qa, test_qa = _split(questions(), 48, rng)
    files = {
        "chat_train.jsonl": chat_rows(train_qa, rng, 0.2), "chat_test.jsonl": chat_rows(test_qa, rng, 0.0),
        "preferences_train.jsonl": preference_rows(train_qa), "preferences_test.jsonl": preference_rows(test_qa),
    }
    paths = []
    for name, rows in files.items():
        paths.append(os.path.join(directory, name))
        _write_jsonl(paths[-1], rows)
    for name, n in (("text_train.txt", 400), ("text_test.txt", 60)):
        paths.append(os.path.join(directory, name))
        with open(paths[-1], "w", encoding="utf-8") as f:
            f.write("\n".join(almanac(rng, n)) + "\n")
    assert all(re.fullmatch(FORMAT_REGEX, formatted(a)) for _, a in train_qa)
    return paths


if __name__ == "__main__":
    for p in generate():
        print(p)
