"""Retrieval examples at an exact context length, in the style of RULER (Hsieh et al., 2024).

Tasks (RULER's templates and answer prefixes, its needles of 7-digit numbers):
  niah_single      one needle "One of the special magic numbers for {key} is: {value}."; asked for it
  niah_multikey    four needles of different keys; asked for one (the others distract)
  niah_multivalue  four needles of the same key; asked for all four values
  vt               variable tracking: "VAR A = 12345." then four hops "VAR B = VAR A." ...; asked which
                   variables hold the value (five)
Haystacks: `essay`, real text: the first `kvjax.data.SHERLOCK_EVAL_TOKENS` tokens of Sherlock, which
no controller or allocation trains on, from a random offset; `noise`, RULER's repeated sentences.
`vt` always sits in noise, as in RULER.

Depth is where the asked needle sits in the haystack, 0 (first) to 1 (last), moved to the nearest
sentence end; the other needles (distractors, more values, the chain's later hops) sit at random
depths after it for vt and anywhere for the others. An example is a prompt of exactly
`length - max_new` token ids (the model's chat template around the instruction, the answer
prefix after it) and the strings a greedy answer must contain. Every example is a function of
(task, haystack, length, depth, index) alone, so every policy answers the same ones.
"""

from __future__ import annotations

import dataclasses
import random

from kvjax.errors import KvjaxError

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "vt")
VERSION = 1  # of the examples: a change to how they are made starts the answers' archives afresh
HAYSTACKS = ("essay", "noise")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
# the answer's token budget per task: the values with room to spare (RULER's)
MAX_NEW = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "vt": 32}
NEEDLES = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "vt": 5}
_ADJECTIVES = ("quiet", "amber", "hollow", "bright", "silver", "ancient", "gentle", "crimson", "frozen", "swift",
               "golden", "lonely", "marble", "velvet", "wooden", "hidden", "rustic", "scarlet", "distant", "tender")
_NOUNS = ("harbor", "lantern", "meadow", "violin", "falcon", "orchard", "compass", "glacier", "thimble", "canyon",
          "pillow", "sparrow", "engine", "garden", "anchor", "mirror", "ladder", "candle", "ribbon", "saddle")
_SENTENCE_ENDS = (".", "!", "?", "\n")


@dataclasses.dataclass(frozen=True)
class Example:
    ids: list[int]  # the prompt: exactly length - max_new tokens
    answers: list[str]  # what the answer must contain (score: the fraction that it does)
    max_new: int


def score(text: str, answers: list[str]) -> float:
    """RULER's string_match_all: the fraction of `answers` found in the generated text."""
    return sum(a in text for a in answers) / len(answers)


class Builder:
    """Makes the examples of one model's tokenizer from one haystack text (its token ids)."""

    def __init__(self, tokenizer, essay_ids: list[int]):
        """essay_ids: the real-text haystack, encoded without a BOS."""
        self.tok = tokenizer
        self.essay = list(essay_ids)
        self.noise = tokenizer.encode(NOISE * 2048, bos=False)
        self._ends = {name: self._sentence_ends(ids) for name, ids in (("essay", self.essay), ("noise", self.noise))}
        if tokenizer.chat_template:  # the instruction as the user's turn, the answer's start as the model's
            before, after = tokenizer.apply_chat_template([{"role": "user", "content": "\x00"}]).split("\x00")
        else:
            before, after = "", "\n"
        self._chat = (before, after)

    def _sentence_ends(self, ids: list[int]) -> list[int]:
        """Indices i such that a sentence ends with token i - 1 (0 and len(ids) count too)."""
        ends = [i + 1 for i, t in enumerate(ids) if self.tok.decode([t]).rstrip(" ").endswith(_SENTENCE_ENDS)]
        return [0] + ends + [len(ids)]

    def example(self, task: str, haystack: str, length: int, depth: float, index: int) -> Example:
        rng = random.Random(f"{task}|{haystack}|{length}|{depth:.4f}|{index}")
        if task == "vt":
            head, question, prefix, needles, answers = self._variable_tracking(rng)
            haystack = "noise"
        else:
            head, question, prefix, needles, answers = self._niah(task, rng)
        enc = lambda text: self.tok.encode(text, bos=False)  # the one BOS, if the model wants one, goes first
        head_ids, tail_ids = self.tok.encode(self._chat[0] + head), enc(question + self._chat[1] + prefix)
        needle_ids = [enc(" " + n) for n in needles]
        n = length - MAX_NEW[task] - len(head_ids) - len(tail_ids) - sum(map(len, needle_ids))
        if n < 16:
            raise KvjaxError(f"--lengths {length} leaves no room for a haystack in {task}")
        source, ends = (self.essay, self._ends["essay"]) if haystack == "essay" else (self.noise, self._ends["noise"])
        if n > len(source):
            raise KvjaxError(f"--lengths {length} needs {n} haystack tokens, the {haystack} text has {len(source)}")
        start = rng.choice([e for e in ends if e <= len(source) - n] or [0])  # at a sentence's start
        hay = source[start:start + n]
        cuts = [e - start for e in ends if start <= e <= start + n] or [0, n]
        cuts = sorted(set([0, n] + cuts))
        depths = [depth] + self._other_depths(task, depth, len(needles) - 1, rng)
        at = [min(cuts, key=lambda c: abs(c - d * n)) for d in depths]
        order = sorted(range(len(needles)), key=lambda i: (at[i], i))
        ids, last = list(head_ids), 0
        for i in order:
            ids += hay[last:at[i]] + needle_ids[i]
            last = at[i]
        ids += hay[last:] + tail_ids
        assert len(ids) == length - MAX_NEW[task], (len(ids), length)
        return Example(ids, answers, MAX_NEW[task])

    @staticmethod
    def _other_depths(task: str, depth: float, count: int, rng: random.Random) -> list[float]:
        if task == "vt":  # the chain's later hops follow the first, in order
            return sorted(depth + (1 - depth) * rng.random() for _ in range(count))
        return [rng.random() for _ in range(count)]

    @staticmethod
    def _niah(task: str, rng: random.Random):
        keys = rng.sample([f"{a}-{b}" for a in _ADJECTIVES for b in _NOUNS], 4)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in range(4)]
        if task == "niah_single":
            pairs = [(keys[0], values[0])]
        elif task == "niah_multikey":
            pairs = list(zip(keys, values))
        else:
            pairs = [(keys[0], v) for v in values]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in pairs]
        many = task == "niah_multivalue"
        head = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.\n")
        tail = (f"\nWhat {'are all' if many else 'is'} the special magic number{'s' if many else ''} for {keys[0]} "
                "mentioned in the provided text?")
        prefix = f"The special magic number{'s' if many else ''} for {keys[0]} mentioned in the provided text " \
                 f"{'are' if many else 'is'}"
        return head, tail, prefix, needles, [v for _, v in pairs] if many else [values[0]]

    @staticmethod
    def _variable_tracking(rng: random.Random):
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(NEEDLES["vt"])]
        value = str(rng.randrange(10_000, 100_000))
        shown = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(NEEDLES["vt"])]
        shown_value = str(rng.randrange(10_000, 100_000))
        chain = lambda names, value: [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        task = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        question = lambda value: f"\nQuestion: Find all variables that are assigned the value {value} in the text above."
        prefix = lambda value: (f"Answer: According to the chain(s) of variable assignment in the text above, "
                                f"{len(names)} variables are assigned the value {value}, they are:")
        # RULER's one worked example, with a short haystack of its own, before the task
        example = (task + " ".join(NOISE.split(". ")[0] + ". " + s for s in chain(shown, shown_value))
                   + question(shown_value) + "\n" + prefix(shown_value) + " " + " ".join(shown) + "\n\n")
        return example + task, question(value), prefix(value), chain(names, value), names
