"""The wordgen suites' text, all from WordNet 3.0 (`flexmerge.suites.wordnet.iter_synsets`): the
dictionary entries the base model is pretrained on, and 8 generative tasks, each a prompt with
one answer.

Each task is one relation WordNet states, kept only where it gives one answer: a word whose
relation leads to two different answers (over all its senses) is left out. Inputs and answers
are single words unless the relation's target is a phrase ("Middle Ages"); underscores become
spaces. The classification-like tasks (category, pos) draw the same number of examples per
class, so that always answering the commonest class is worth 1 / classes. Pools and splits are
drawn with seeded generators, so the same seed gives the same rows.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from flexmerge.suites.wordnet import Synset

Pair = tuple[str, str]  # (prompt, answer)
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
MAX_DEFINITION_WORDS = 20  # definitions in prompts: at most this many words (bounds sequence length)
SMALL_CATEGORIES = ("noun.Tops", "noun.motive")  # ~50 synsets each: too few to draw a class from


def text(word: str) -> str:
    return word.replace("_", " ")


def single_word(word: str) -> bool:
    """A plain lowercase word (no phrase, digits, hyphens or proper noun): a clean prompt input."""
    return word.isalpha() and word.isascii() and word.islower()


@dataclass(frozen=True)
class WordNet:
    """The synsets by (part of speech, offset), and the lookups the tasks share."""

    synsets: dict[tuple[str, str], Synset]
    _pools: dict[str, list[Pair]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, synsets: Iterable[Synset]) -> WordNet:
        return cls({s.key: s for s in synsets})

    def related(self, pos: str, symbol: str, target_pos: str, categories: tuple[str, ...] = ()) -> dict[str, str]:
        """word -> the one word its `symbol` pointers reach (of `target_pos`, in `categories` when
        given), over every sense of the word; words reaching several are left out."""
        found: dict[str, set[str]] = defaultdict(set)
        for s in self.synsets.values():
            if s.pos != pos:
                continue
            for p in s.pointers:
                if p.symbol != symbol or p.pos != target_pos:
                    continue
                target = self.synsets[(p.pos, p.offset)]
                if categories and target.lexname not in categories:
                    continue
                sources = s.words if p.source == 0 else (s.words[p.source - 1],)
                answer = text(target.words[max(p.target, 1) - 1])
                for word in sources:
                    found[word].add(answer)
        return {w: a.pop() for w, a in found.items() if len(a) == 1 and single_word(w)}

    def only_pos(self) -> dict[str, str]:
        """word -> its part of speech, for words of one part of speech only."""
        found: dict[str, set[str]] = defaultdict(set)
        for s in self.synsets.values():
            for word in s.words:
                found[word].add(s.pos)
        return {w: POS_NAMES[p.pop()] for w, p in found.items() if len(p) == 1 and single_word(w)}

    def definitions(self, pos: str) -> list[Synset]:
        """The synsets of `pos` whose definition is at most MAX_DEFINITION_WORDS words."""
        return [s for s in self.synsets.values()
                if s.pos == pos and s.definition and len(s.definition.split()) <= MAX_DEFINITION_WORDS]


def invert(pairs: Mapping[str, str]) -> dict[str, str]:
    """answer -> word, for answers that one word only leads to (and that are single words)."""
    found: dict[str, set[str]] = defaultdict(set)
    for word, answer in pairs.items():
        found[answer].add(word)
    return {a: w.pop() for a, w in found.items() if len(w) == 1 and single_word(a)}


def genus_of(wn: WordNet, s: Synset) -> str | None:
    """The hypernym's word that the definition names (a definition is usually genus + difference:
    "a young dog" -> dog), when the synset has one hypernym and exactly one of its words is in
    the definition as a whole word; else None."""
    hypernyms = [p for p in s.pointers if p.symbol == "@"]
    if len(hypernyms) != 1:
        return None
    words = wn.synsets[(hypernyms[0].pos, hypernyms[0].offset)].words
    named = [text(w) for w in words
             if text(w) in s.definition and re.search(rf"\b{re.escape(text(w))}\b", s.definition)]
    return named[0] if len(named) == 1 else None


def balanced(pairs: list[Pair], total: int, seed: int) -> list[Pair]:
    """`total // classes` pairs of each class (the answer is the class; a seeded draw), class by class."""
    by_class: dict[str, list[Pair]] = defaultdict(list)
    for pair in pairs:
        by_class[pair[1]].append(pair)
    per_class = total // len(by_class)
    rng = random.Random(seed)
    out: list[Pair] = []
    for label in sorted(by_class):
        if len(by_class[label]) < per_class:
            raise ValueError(f"class {label!r} has {len(by_class[label])} examples, fewer than the {per_class} asked")
        out += rng.sample(by_class[label], per_class)
    return out


def _relation(prompt: str, pairs: Callable[[WordNet], Mapping[str, str]]) -> Callable[[WordNet], list[Pair]]:
    return lambda wn: [(prompt.format(w), a) for w, a in pairs(wn).items()]


def _hypernym(wn: WordNet) -> list[Pair]:
    out = []
    for s in wn.definitions("noun"):
        genus = genus_of(wn, s)
        if genus is not None and single_word(s.words[0]):
            out.append((f"Hypernym of {s.words[0]}, {s.definition}", genus))
    return out


def _category(wn: WordNet) -> list[Pair]:
    return [(f"Category of: {s.definition}", s.lexname.split(".", 1)[1]) for s in wn.definitions("noun")
            if s.lexname not in SMALL_CATEGORIES]


def _pos(wn: WordNet) -> list[Pair]:
    return [(f"Part of speech of: {word}", pos) for word, pos in wn.only_pos().items()]


# name -> (what it asks, candidate (prompt, answer) pairs of the whole of WordNet)
TASKS: dict[str, tuple[str, Callable[[WordNet], list[Pair]]]] = {
    "adverb": ("adjective -> its adverb (quick -> quickly)",
               _relation("Adverb of: {}", lambda wn: invert(wn.related("adv", "\\", "adj")))),
    "pertainym": ("relational adjective -> the noun it pertains to (musical -> music)",
                  _relation("Noun of the adjective: {}", lambda wn: wn.related("adj", "\\", "noun"))),
    "antonym": ("adjective -> its antonym (able -> unable)",
                _relation("Antonym of: {}", lambda wn: wn.related("adj", "!", "adj"))),
    "agent": ("verb -> who does it (teach -> teacher)",
              _relation("Person who does: {}", lambda wn: wn.related("verb", "+", "noun", ("noun.person",)))),
    "action": ("verb -> the act of doing it (banish -> banishment)",
               _relation("Act of doing: {}", lambda wn: wn.related("verb", "+", "noun", ("noun.act",)))),
    "hypernym": ("noun and its definition -> the hypernym the definition names (puppy, a young dog -> dog)",
                 _hypernym),
    "category": ("noun definition -> its lexicographer category (24 classes, balanced)", _category),
    "pos": ("word -> its part of speech (4 classes, balanced)", _pos),
}
BALANCED = ("category", "pos")  # answers are classes: drawn equally per class


def candidates(wn: WordNet, task: str) -> list[Pair]:
    """Every (prompt, answer) pair of `task` in WordNet, in file order, computed once per WordNet;
    a prompt that recurs with another answer (two synsets of one definition) is left out."""
    if task not in wn._pools:
        answers: dict[str, set[str]] = defaultdict(set)
        for prompt, answer in TASKS[task][1](wn):
            answers[prompt].add(answer)
        wn._pools[task] = [(prompt, a.pop()) for prompt, a in answers.items() if len(a) == 1]
    return wn._pools[task]


def task_pairs(wn: WordNet, task: str, total: int, seed: int) -> list[Pair]:
    """At most `total` (prompt, answer) pairs of `task`, in a seeded order; classes balanced for
    the tasks in BALANCED."""
    pairs = candidates(wn, task)
    pairs = balanced(pairs, total, seed) if task in BALANCED else list(pairs)
    random.Random(seed).shuffle(pairs)
    return pairs[:total]


def split_pairs(pairs: list[Pair], n_val: int, n_test: int, n_train: int) -> dict[str, list[Pair]]:
    """test, val, then train (at most `n_train`) from the front of a shuffled pool."""
    if len(pairs) < n_test + n_val + 1:
        raise ValueError(f"{len(pairs)} examples are too few for {n_test} test and {n_val} validation examples")
    return {"test": pairs[:n_test], "val": pairs[n_test:n_test + n_val],
            "train": pairs[n_test + n_val:n_test + n_val + n_train]}


def dictionary_entry(s: Synset) -> str:
    """A synset as pretraining text: `breathe, respire (verb): draw air into ...; "example"`."""
    entry = f"{', '.join(text(w) for w in s.words)} ({POS_NAMES[s.pos]}): {s.definition}"
    return entry + "".join(f'; "{e}"' for e in s.examples)
