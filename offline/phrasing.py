"""How people word the synthetic family: a phrasing grammar, split into what the build may use and what is held out.

A user does not write the library's template ("a photo of a red circle"). The grammar below is the stand-in for
the many ways a colour-shape task is described, in two disjoint halves:

* BUILD side — the tiny base's pretraining captions (the role web-scale pretraining plays for CLIP), the extra
  phrasings per seen task the transfer router and the domain gate are fitted and validated on, and the synthetic
  out-of-domain descriptions the gate is calibrated on.
* HELD-OUT side — other templates and word orders, and other out-of-domain descriptions, read only by the
  evaluation (offline/evaluate.py). Nothing in the build imports them; never tune on them.

Library experts keep one template each, as the paper's "a photo of a <class>".

Synonyms are in the build grammar (a real CLIP knows "violet" and "purple"); held-out phrasings use the family's
own words in new templates, so they test wording, not vocabulary the model could not have seen.

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

LIBRARY_TEMPLATE = "a photo of a {c} {s}"

# Words the build grammar may swap in, with the family's own word kept as the most frequent choice.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise blue"),
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "cross": ("cross", "plus sign"),
    "ring": ("ring", "hoop", "hollow circle"),
    "star": ("star", "five-pointed star"),
    "triangle": ("triangle",),
}

# Task-description phrasings the build may use ({c} colour, {s} shape). The first is the library's template.
BUILD_DESCRIPTION_TEMPLATES: tuple[str, ...] = (
    LIBRARY_TEMPLATE,
    "a picture of a {c} {s}",
    "an image of a {c} {s}",
    "{c} {s}",
    "a {c} {s}",
    "a {s} that is {c}",
    "a {s} in {c}",
    "photos showing a {c} {s}",
    "a drawing of a {c} {s}",
    "the {c} {s}",
    "a {c} coloured {s}",
    "find images with a {c} {s}",
    "a {s}, {c}",
    "{c} {s} on a plain background",
)

# Held out: evaluation only (offline/evaluate.py). Other templates and word orders than any above.
HELD_OUT_DESCRIPTION_TEMPLATES: tuple[str, ...] = (
    "the {s} is {c}",
    "show me {c} {s}s",
    "i am looking for a {s} coloured {c}",
    "pictures where the shape is a {c} {s}",
    "{c}-coloured {s}",
    "one {c} {s} somewhere in the frame",
    "retrieve the {s} painted {c}",
    "a simple graphic of a {c} {s}",
    "{s}, {c} colour",
)

# Out-of-domain descriptions the build calibrates the gate on: unknown colours and shapes, other domains, nonsense.
BUILD_OUT_OF_DOMAIN: tuple[str, ...] = (
    "a photo of a teal circle", "a photo of a maroon square", "a photo of a navy star", "a photo of an olive ring",
    "a photo of a red pentagon", "a photo of a green crescent", "a photo of a blue heart", "a photo of a pink arrow",
    "a photo of a magenta spiral", "a photo of a lavender diamond",
    "a photo of a cat", "a street at night", "a bowl of soup", "a person riding a bicycle",
    "a histology slide of tissue", "a bar chart of quarterly sales", "a mountain lake at sunrise",
    "a close-up of a green leaf", "a page of handwritten notes", "an aerial photo of farmland",
    "a photo of a yellow taxi", "a blue whale in the ocean",
)
# Nonsense is generated (seeded) from these syllables and function words, so there is more of it than a list.
_SYLLABLES = ("bla", "zor", "quin", "tep", "mu", "frak", "oli", "snev", "pra", "dox")
_FUNCTION_WORDS = ("the", "of", "and", "to", "in", "is", "with", "for", "on", "by")

# Held out: evaluation only. Different unknown attributes, domains and nonsense than the build's.
HELD_OUT_OUT_OF_DOMAIN: dict[str, tuple[str, ...]] = {
    "unknown attribute": ("a photo of a brown hexagon", "a photo of a gold oval", "a photo of a silver circle",
                          "a photo of a red octagon", "a photo of a tan rectangle"),
    "other domain": ("a photo of a dog", "a chest x-ray", "a satellite image of a city",
                     "a portrait of a smiling woman", "a plate of pasta", "a red sports car",
                     "a screenshot of a spreadsheet", "a forest in autumn"),
    "nonsense": ("asdf qwerty zxcv", "the of and to in", "lorem ipsum dolor sit amet", "xkcd blorp fizzle"),
}


def _fill(template: str, colour: str, shape: str) -> str:
    return template.format(c=colour, s=shape)


def build_phrasings(colour: str, shape: str) -> tuple[str, ...]:
    """Every build-side description of a colour-shape task, the library template first (family words only)."""
    return tuple(_fill(t, colour, shape) for t in BUILD_DESCRIPTION_TEMPLATES)


def held_out_phrasings(colour: str, shape: str) -> tuple[str, ...]:
    """The held-out descriptions of a colour-shape task: evaluation only."""
    return tuple(_fill(t, colour, shape) for t in HELD_OUT_DESCRIPTION_TEMPLATES)


def build_nonsense(n: int, seed: int = 0) -> tuple[str, ...]:
    """n seeded nonsense descriptions: made-up words, or function words with nothing to describe."""
    rng = random.Random(f"nonsense:{seed}")
    out = []
    for i in range(n):
        pool = _SYLLABLES if i % 2 == 0 else _FUNCTION_WORDS
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) if pool is _SYLLABLES
                 else rng.choice(pool) for _ in range(rng.randint(2, 5))]
        out.append(" ".join(words))
    return tuple(out)


def build_out_of_domain() -> tuple[str, ...]:
    """The out-of-domain descriptions the build calibrates the gate on."""
    return BUILD_OUT_OF_DOMAIN + build_nonsense(8)


# ------------------------------------------------------------------------------------------ pretraining captions

# Words with no colour or shape in them, which people put around a description ("here is", "i want", "simple").
# Pretraining captions carry a few of them at random, so the text tower learns they say nothing about the
# image — as a real CLIP knows the common words of English. The held-out templates are new arrangements of known
# words (a test asserts it), so they test wording, not words the model could never have seen.
FILLER_WORDS: tuple[str, ...] = (
    "a", "an", "the", "one", "some", "this", "that", "these", "it", "its", "there", "here", "is", "are", "be",
    "am", "i", "we", "you", "me", "my", "our", "your", "please", "just", "only", "also", "very", "really", "quite",
    "of", "in", "on", "at", "with", "for", "to", "and", "or", "where", "which", "what", "somewhere", "anywhere",
    "show", "shows", "showing", "shown", "see", "seen", "look", "looking", "find", "want", "need", "get",
    "retrieve", "search", "searching", "give", "display", "displayed", "contains", "containing", "has", "have",
    "picture", "pictures", "photo", "photos", "image", "images", "drawing", "graphic", "illustration", "frame",
    "scene", "view", "shape", "shapes", "colour", "color", "coloured", "colored", "painted", "drawn", "filled",
    "simple", "plain", "clear", "little", "big", "nice", "single", "kind", "sort", "example", "sample", "thing",
)
_CAPTION = re.compile(r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) at the (?P<position>[\w ]+) "
                      r"on a (?P<bg>\w+) background$")
_PREFIXES = ("", "", "a photo of ", "a picture of ", "an image of ", "a drawing of ", "there is ", "photo: ")
_POSITION = ("", " at the {p}", " in the {p}", " near the {p}", ", {p}")
_BACKGROUND = ("", " on a {b} background", " against {b}", ", {b} background", " over a plain {b} backdrop")


_SUBJECTS = ("a {size} {c} {s}", "a {c} {s}", "{c} {s}", "a {s} that is {c}", "a {size} {s} in {c}",
             "a {c} coloured {s}", "the {c} {s}", "a {s}, {c}")


def _subject(size: str, colour: str, shape: str, rng: random.Random) -> str:
    c, s = (word if rng.random() < 0.6 else rng.choice(SYNONYMS.get(word, (word,))) for word in (colour, shape))
    return rng.choice(_SUBJECTS).format(size=size, c=c, s=s)


def phrase_caption(caption: str, rng: random.Random) -> str:
    """A random build-side wording of a synthetic caption ("a small red circle at the top left on a white
    background"); captions of other data come back unchanged."""
    m = _CAPTION.match(caption)
    if m is None:
        return caption
    subject = rng.choice(_PREFIXES) + _subject(m["size"], m["colour"], m["shape"], rng)
    caption = subject + rng.choice(_POSITION).format(p=m["position"]) + rng.choice(_BACKGROUND).format(b=m["bg"])
    return _with_filler(caption, rng)


def _with_filler(caption: str, rng: random.Random) -> str:
    """Half the time, one to three filler words before and/or after the caption."""
    if rng.random() < 0.5:
        return caption
    words = [rng.choice(FILLER_WORDS) for _ in range(rng.randint(1, 3))]
    cut = rng.randint(0, len(words))
    return " ".join(words[:cut] + [caption] + words[cut:])


def caption_variants(caption: str, n: int, seed: int) -> list[str]:
    """n build-side wordings of one caption (the canonical one first), seeded by the caption and seed."""
    rng = random.Random(f"{seed}:{caption}")
    return [caption] + [phrase_caption(caption, rng) for _ in range(n - 1)]


def _words(text: str) -> set[str]:
    """The words of a grammar string, its {placeholders} left out."""
    return set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", " ", text.lower())))


def pretraining_vocabulary(family_words: Iterable[str]) -> frozenset[str]:
    """Every word a build-side caption or description can hold: the grammar's own words, its synonyms and filler,
    and `family_words` (the data's colours, shapes, sizes, positions, backgrounds). The tiny base never saw any other
    word: its text tower cannot read one (its token keeps its random initial embedding)."""
    grammar = (*_PREFIXES, *_POSITION, *_BACKGROUND, *_SUBJECTS, *BUILD_DESCRIPTION_TEMPLATES, *FILLER_WORDS,
               *(w for synonyms in SYNONYMS.values() for w in synonyms), *family_words)
    return frozenset(w for text in grammar for w in _words(text))


def unknown_words(text: str, vocabulary: frozenset[str]) -> list[str]:
    """The words of `text` outside `vocabulary`, in order."""
    return [w for w in re.findall(r"[a-z]+", text.lower()) if w not in vocabulary]
