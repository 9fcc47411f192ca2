"""The wordgen suites' text, all from WordNet 3.0 (`flexmerge.suites.wordnet.iter_synsets`): the
dictionary entries the base model is pretrained on, and 8 generative tasks, each a prompt with
one answer.

Each task reads a word, a definition or an example sentence and answers with what WordNet says
of it: a part of speech, a lexicographer category, a topic domain or a hypernym (a word or a
phrase such as "bird genus"). A tiny model learns these from the prompt itself (suffixes, the definition's
words); answers that need a copy of the prompt's own tokens (quick -> quickly) it does not learn
in the suite's budget, so no task asks for one. A task keeps the K commonest answers and draws
the same number of examples of each, so that always giving one answer scores 1 / K; a prompt
that WordNet gives two answers for (a word in two parts of speech, one definition in two
synsets) is left out. Pools and splits are drawn with seeded generators: the same seed gives
the same rows.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from flexmerge.suites.wordnet import Synset

Pair = tuple[str, str]  # (prompt, answer)
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
MAX_DEFINITION_WORDS = 20  # definitions in prompts: at most this many words (bounds sequence length)


def text(word: str) -> str:
    return word.replace("_", " ")


def single_word(word: str) -> bool:
    """A plain lowercase word (no phrase, digits, hyphens or proper noun): a clean prompt input."""
    return word.isalpha() and word.isascii() and word.islower()


def category(s: Synset) -> str:
    """The lexicographer category without its part of speech: noun.artifact -> artifact."""
    return s.lexname.split(".", 1)[1]


@dataclass(frozen=True)
class WordNet:
    """The synsets by (part of speech, offset), and each task's candidate pairs once computed."""

    synsets: dict[tuple[str, str], Synset]
    _pools: dict[str, list[Pair]] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, synsets: Iterable[Synset]) -> WordNet:
        return cls({s.key: s for s in synsets})

    def defined(self, pos: str) -> Iterator[Synset]:
        """The synsets of `pos` whose definition is at most MAX_DEFINITION_WORDS words."""
        return (s for s in self.synsets.values()
                if s.pos == pos and s.definition and len(s.definition.split()) <= MAX_DEFINITION_WORDS)

    def hypernym(self, s: Synset) -> str | None:
        """The first word of the synset's one hypernym (None: it has none, or several)."""
        found = [p for p in s.pointers if p.symbol == "@"]
        return text(self.synsets[(found[0].pos, found[0].offset)].words[0]) if len(found) == 1 else None

    def monosemous(self, pos: str | None = None) -> dict[str, Synset]:
        """Single words (`single_word`) with one sense in all of WordNet (of `pos`, when given) -> that sense."""
        senses: dict[str, list[Synset]] = defaultdict(list)
        for s in self.synsets.values():
            for word in s.words:
                senses[word].append(s)
        return {w: ss[0] for w, ss in senses.items()
                if len(ss) == 1 and single_word(w) and (pos is None or ss[0].pos == pos)}

    def only_pos(self) -> dict[str, str]:
        """Single words of one part of speech only -> that part of speech."""
        found: dict[str, set[str]] = defaultdict(set)
        for s in self.synsets.values():
            for word in s.words:
                found[word].add(s.pos)
        return {w: POS_NAMES[p.pop()] for w, p in found.items() if len(p) == 1 and single_word(w)}


def _pos(wn: WordNet) -> Iterable[Pair]:
    return ((f"Part of speech of: {w}", pos) for w, pos in wn.only_pos().items())


def _gloss_pos(wn: WordNet) -> Iterable[Pair]:
    return ((f"Part of speech of the word defined as: {s.definition}", POS_NAMES[pos])
            for pos in POS_NAMES for s in wn.defined(pos))


def _pos_in_context(wn: WordNet) -> Iterable[Pair]:
    """Words of several parts of speech, in a synset's example: the context tells which."""
    one_pos = wn.only_pos()
    for s in wn.synsets.values():
        for example in s.examples:
            if len(example.split()) > MAX_DEFINITION_WORDS:
                continue
            for w in s.words:
                if single_word(w) and w not in one_pos and re.search(rf"\b{w}\b", example):
                    yield f"Part of speech of {w} in: {example}", POS_NAMES[s.pos]


def _noun_category(wn: WordNet) -> Iterable[Pair]:
    return ((f"Category of the noun defined as: {s.definition}", category(s)) for s in wn.defined("noun"))


def _word_category(wn: WordNet) -> Iterable[Pair]:
    return ((f"Category of the noun: {w}", category(s)) for w, s in wn.monosemous("noun").items())


def _domain(wn: WordNet) -> Iterable[Pair]:
    for pos in POS_NAMES:
        for s in wn.defined(pos):
            domains = [p for p in s.pointers if p.symbol == ";c"]
            if len(domains) == 1:
                yield f"Domain of: {s.definition}", text(wn.synsets[(domains[0].pos, domains[0].offset)].words[0])


def _hypernym(pos: str) -> Callable[[WordNet], Iterable[Pair]]:
    def pairs(wn: WordNet) -> Iterable[Pair]:
        for s in wn.defined(pos):
            hypernym = wn.hypernym(s)
            if hypernym is not None:
                yield f"Hypernym of the {pos} defined as: {s.definition}", hypernym
    return pairs


@dataclass(frozen=True)
class Task:
    """A generative task: what it asks, its K answers (the commonest), and its candidate pairs."""

    asks: str
    answers: int
    pairs: Callable[[WordNet], Iterable[Pair]]


TASKS: dict[str, Task] = {
    "pos": Task("word -> its part of speech", 4, _pos),
    "gloss_pos": Task("definition -> the part of speech of the word it defines", 4, _gloss_pos),
    "noun_category": Task("noun definition -> its lexicographer category", 12, _noun_category),
    "pos_in_context": Task("word of several parts of speech, in an example sentence -> its part of speech there",
                           4, _pos_in_context),
    "word_category": Task("noun (one sense in WordNet) -> its lexicographer category", 8, _word_category),
    "domain": Task("definition -> its topic domain (law, music, ...)", 8, _domain),
    "hypernym": Task("noun definition -> its hypernym (person, bird genus, ...)", 16, _hypernym("noun")),
    "verb_hypernym": Task("verb definition -> its hypernym (change, move, ...)", 12, _hypernym("verb")),
}


def candidates(wn: WordNet, task: str) -> list[Pair]:
    """Every (prompt, answer) pair of `task` whose answer is one of its K commonest, in file order,
    computed once per WordNet; a prompt that recurs with another answer is left out."""
    if task not in wn._pools:
        answers: dict[str, set[str]] = defaultdict(set)
        for prompt, answer in TASKS[task].pairs(wn):
            answers[prompt].add(answer)
        pairs = [(prompt, a.pop()) for prompt, a in answers.items() if len(a) == 1]
        common = {a for a, _ in Counter(a for _, a in pairs).most_common(TASKS[task].answers)}
        wn._pools[task] = [(prompt, a) for prompt, a in pairs if a in common]
    return wn._pools[task]


def task_pairs(wn: WordNet, task: str, total: int, seed: int) -> list[Pair]:
    """At most `total` (prompt, answer) pairs of `task`, as many of each answer (a seeded draw:
    `total // K`, or all of the rarest answer's if fewer), in a seeded order."""
    by_answer: dict[str, list[Pair]] = defaultdict(list)
    for pair in candidates(wn, task):
        by_answer[pair[1]].append(pair)
    per_answer = min(total // len(by_answer), *(len(p) for p in by_answer.values()))
    rng = random.Random(seed)
    pairs = [pair for answer in sorted(by_answer) for pair in rng.sample(by_answer[answer], per_answer)]
    rng.shuffle(pairs)
    return pairs


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
