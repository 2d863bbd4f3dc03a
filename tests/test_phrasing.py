"""The phrasing grammar (offline/phrasing.py): its build / held-out split, and the captions pretraining sees."""

from __future__ import annotations

import random
import re
from pathlib import Path

from offline import phrasing
from offline.data import COLOURS, FAMILY_WORDS, SHAPES, synthetic_family

OFFLINE = Path(__file__).parent.parent / "offline"


def test_build_and_held_out_wordings_are_disjoint_and_the_library_keeps_its_template():
    for colour in COLOURS:
        for shape in SHAPES:
            build, held = phrasing.build_phrasings(colour, shape), phrasing.held_out_phrasings(colour, shape)
            assert build[0] == f"a photo of a {colour} {shape}"
            assert not set(build) & set(held)
            assert all(colour in text and shape in text for text in build + held)
    task = synthetic_family(n_pairs=1)[0]
    assert task.description == task.phrasings[0] and len(task.phrasings) == len(phrasing.BUILD_DESCRIPTION_TEMPLATES)


def test_held_out_sets_are_read_by_the_evaluation_only():
    readers = sorted(p.name for p in OFFLINE.glob("*.py")
                     if re.search(r"HELD_OUT|held_out_phrasings", p.read_text()) and p.name != "phrasing.py")
    assert readers == ["evaluate_wording.py"]
    held_ood = {t for texts in phrasing.HELD_OUT_OUT_OF_DOMAIN.values() for t in texts}
    assert not held_ood & set(phrasing.build_out_of_domain())


def test_pretraining_captions_vary_and_keep_what_the_image_shows():
    canonical = "a small red circle at the top left on a white background"
    variants = phrasing.caption_variants(canonical, 40, seed=0)
    assert variants[0] == canonical and len(set(variants)) >= 30
    red = {"red"}
    circle = set(phrasing.SYNONYMS["circle"])
    for v in variants:
        assert any(w in v for w in red) and any(w in v for w in circle), v
        assert not any(other in v.split() for other in set(COLOURS) - red)  # never another colour
    assert phrasing.caption_variants(canonical, 5, 0) == phrasing.caption_variants(canonical, 5, 0)
    assert phrasing.phrase_caption("a photo of a tulip", random.Random(0)) == "a photo of a tulip"  # other data


def test_nonsense_is_seeded_and_has_no_family_words():
    assert phrasing.build_nonsense(6, 0) == phrasing.build_nonsense(6, 0)
    family = set(COLOURS) | set(SHAPES)
    assert not any(family & set(text.split()) for text in phrasing.build_nonsense(20, 0))


def test_held_out_templates_rearrange_words_pretraining_knows():
    """Held-out wordings test wording, not vocabulary the tiny base could never have seen (a real CLIP knows the
    common words of English). "<shape>s" (a plural) is the one form pretraining never shows."""
    known = phrasing.pretraining_vocabulary(FAMILY_WORDS)
    for template in phrasing.HELD_OUT_DESCRIPTION_TEMPLATES:
        text = template.replace("{s}s", "{s}").format(c="red", s="circle")
        assert not phrasing.unknown_words(text, known), template
    assert phrasing.unknown_words("show me red circles", known) == ["circles"]


def test_pretraining_vocabulary_holds_every_word_pretraining_and_the_build_use():
    known = phrasing.pretraining_vocabulary(FAMILY_WORDS)
    captions = [p.caption for t in synthetic_family(n_pairs=3) for p in t.pairs]
    variants = [v for i, c in enumerate(captions) for v in phrasing.caption_variants(c, 12, seed=i)]
    descriptions = [d for t in synthetic_family(n_pairs=0) for d in t.phrasings]
    for text in variants + descriptions:
        assert not phrasing.unknown_words(text, known), text
    # The out-of-domain sets name what the family does not have: unknown colours, shapes and domains.
    assert phrasing.unknown_words("a photo of a teal circle", known) == ["teal"]
    assert phrasing.unknown_words("A photo of a red pentagon", known) == ["pentagon"]
