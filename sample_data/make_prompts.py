"""Writes sample_data/prompts.txt and sample_data/heldout_prompts.txt: TinyStories-style story openings.

Deterministic (fixed seed); rerun with `python sample_data/make_prompts.py` to regenerate the files.
Every opening names its main character, which the reward in reward.py looks for.
"""

import random
from pathlib import Path

GIRLS = ["Lily", "Sue", "Mia", "Anna", "Lucy", "Sara", "Amy", "Zoe", "Kim", "Molly", "Emma", "Jane"]
BOYS = ["Tom", "Ben", "Tim", "Max", "Sam", "Jack", "Bob", "Leo", "Joe", "Jake", "Timmy", "Billy"]
PETS = ["Spot", "Buddy", "Fluffy", "Rex", "Coco", "Daisy", "Pip", "Rosie"]
ANIMALS = ["cat", "dog", "bunny", "bird", "frog", "duck", "bear", "mouse", "fish", "fox", "puppy", "kitten"]
ADJS = ["little", "happy", "small", "curious", "brave", "shy", "kind", "silly", "big", "friendly"]
PLACES = ["park", "forest", "beach", "garden", "farm", "pond", "zoo", "store", "school", "lake"]
THINGS = ["ball", "kite", "toy car", "red hat", "big box", "book", "shiny rock", "blue cup", "doll", "drum"]
LIKES = ["play outside", "run in the grass", "sing songs", "eat apples", "jump in puddles",
         "draw pictures", "look at the stars", "build with blocks", "dance", "read books"]
FAMILY = ["mom", "dad", "grandma", "grandpa", "big sister", "little brother", "friend"]


def opening(rng: random.Random) -> str:
    girl = rng.random() < 0.5
    name = rng.choice(GIRLS if girl else BOYS)
    she, her = ("She", "her") if girl else ("He", "his")
    pet, animal, adj = rng.choice(PETS), rng.choice(ANIMALS), rng.choice(ADJS)
    place, thing, like, fam = rng.choice(PLACES), rng.choice(THINGS), rng.choice(LIKES), rng.choice(FAMILY)
    templates = [
        f"Once upon a time, there was a {adj} {'girl' if girl else 'boy'} named {name}.",
        f"Once upon a time, there was a {adj} {animal} named {pet}.",
        f"One day, {name} went to the {place} with {her} {fam}.",
        f"{name} was a {adj} {animal} who lived near the {place}.",
        f"Once upon a time, in a big {place}, there lived a {animal} named {pet}.",
        f"{name} had a {thing}. {she} loved to {like}.",
        f"There was once a {adj} {animal} called {pet}. It loved to {like}.",
        f"One sunny day, {name} found a {thing} in the {place}.",
        f"{name} and {her} {fam} went to the {place} to {like}.",
        f"Once upon a time, a {adj} {'girl' if girl else 'boy'} named {name} wanted to {like}.",
        f"{pet} the {animal} was very {adj}. One day, {pet} saw a {thing}.",
        f"Once there was a {'girl' if girl else 'boy'} named {name} who had a pet {animal} named {pet}.",
    ]
    return rng.choice(templates)


def main() -> None:
    rng = random.Random(260)
    seen: list[str] = []
    while len(seen) < 400:
        text = opening(rng)
        if text not in seen:
            seen.append(text)
    here = Path(__file__).parent
    (here / "prompts.txt").write_text("\n".join(seen[:340]) + "\n")
    (here / "heldout_prompts.txt").write_text("\n".join(seen[340:]) + "\n")


if __name__ == "__main__":
    main()
