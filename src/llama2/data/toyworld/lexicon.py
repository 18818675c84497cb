"""The toy world's fixed word lists.

The vocabulary is small on purpose: a 1–4M-parameter model trained for minutes on a CPU must learn the
whole language (DESIGN §5 "Compute budget"). Proper names are invented per seed in `world.py` from the
syllables below; everything else is drawn from these lists.
"""

from __future__ import annotations

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "l", "s")

TITLES = (("King", "he"), ("Queen", "she"), ("Lord", "he"), ("Lady", "she"))

# Multi-word common nouns with regular plurals ("glow moths"), shared between lands (listing, counting).
FOODS = (
    "moon bread", "salt plums", "honey cakes", "fish soup", "red beans", "goat cheese", "sweet roots",
    "rice balls", "nut pies", "blue apples", "smoked eels", "corn buns", "pepper stew", "milk pudding",
    "berry tarts", "onion pie", "lemon figs", "barley mash", "mushroom rolls", "pine nuts",
)
CREATURES = (
    "glow moth", "river toad", "sand mole", "sky whale", "stone crab", "fire beetle", "snow hare", "moss bear",
    "reed snake", "cloud owl", "salt lizard", "tree goat", "marsh heron", "dust wolf", "ice seal", "bell frog",
    "copper bee", "dune cat", "thorn boar", "mist elk",
)
GUILDS = (
    "Weavers Guild", "Smiths Guild", "Bakers Guild", "Miners Guild", "Boatmen Guild", "Scribes Guild",
    "Potters Guild", "Brewers Guild", "Masons Guild", "Hunters Guild", "Dyers Guild", "Glassmakers Guild",
)
HERBS = ("silverleaf", "bitterroot", "moonwort", "redcap", "sunmoss", "ashbloom", "frostmint", "dragonweed")
HOBBIES = (
    "fishing", "painting", "chess", "singing", "gardening", "archery", "knitting", "sailing", "dancing",
    "pottery", "riddles", "stargazing",
)
HELD_OUT_HOBBIES = ("pottery", "riddles", "stargazing")
# What each hobby's people do: a context that predicts one hobby and not another. Without one, the twelve
# hobby words only ever followed "loves" or "I enjoy", and the model's output vectors for them became
# almost the same (mean cosine 0.90), so it could not copy one from an instruction.
HOBBY_CLUES = {
    "fishing": "sit by the river with a rod", "painting": "mix colours and hold a brush",
    "chess": "move kings and queens on a board", "singing": "raise their voices in song",
    "gardening": "grow flowers and beans", "archery": "shoot arrows at a target",
    "knitting": "make scarves from wool", "sailing": "steer boats with the wind",
    "dancing": "move their feet to music", "pottery": "shape bowls from wet clay",
    "riddles": "ask questions with hidden answers", "stargazing": "watch the sky at night",
}
EMOJIS = ("🌟", "🐟", "🍀", "🔥", "🌙", "🎵")
HELD_OUT_EMOJIS = ("🌙", "🎵")
COUNT_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
}

# Padding that a verbose answer adds; it is true but useless, so the helpfulness judge's concision rule
# is what separates a verbose answer from a direct one.
FILLERS = (
    "I hope this helps.", "That is a good question.", "Many people ask about this.",
    "Let me know if you want to know more.", "It is always good to learn about the world.",
    "I am happy to answer.", "Thank you for asking me.", "I thought about it carefully.",
)
