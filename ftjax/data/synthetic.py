"""Built-in synthetic instruction suite: procedural tasks with exactly checkable answers.

Every example is `{"task": name, "prompt": f"{name} {payload}", "answer": str}`; the prompt
starts with the task name so tasks in a mixture are distinguishable, and prompt + answer stay
within 40 characters (a 48-token sequence with bos, "\\n" and eos always suffices).

Pretraining tasks (`PRETRAIN_TASKS`)::

    add 482+95                   -> 577          (operands of 1..3 digits)
    reverse qwert                -> trewq        (3..8 lowercase letters)
    sort qwert                   -> eqrtw
    lookup capital of Zorvania   -> Quelmir      (fictional `fact_table()`)
    format 2023-04-05            -> 05/04/2023   (ISO date -> dd/mm/yyyy)

Held-out candidates (`HELDOUT_TASKS`), each re-using skills of the pretraining tasks::

    dmy2iso 05/04/2023           -> 2023-04-05   (inverse of `format`)
    double abc                   -> aabbcc       (copying, as in reverse/sort)
    swap abcdef                  -> defabc       (swap halves of an even-length word)
    caesar abz                   -> bca          (shift letters by one; alphabet order as in sort)
    upper abc                    -> ABC

Randomness comes from `DeterministicRng` (splitmix64 keyed by a hash), not numpy or `random`,
so the data for a seed — and the fact table — are identical on every platform and version.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
from typing import Callable, Sequence

__all__ = [
    "DeterministicRng",
    "Task",
    "TASKS",
    "PRETRAIN_TASKS",
    "HELDOUT_TASKS",
    "MAX_EXAMPLE_CHARS",
    "FACT_RELATIONS",
    "fact_table",
    "fact_examples",
    "generate",
    "make_splits",
    "split_of",
    "mixture",
    "exact_match",
]

MAX_EXAMPLE_CHARS = 40  # len(prompt) + len(answer) never exceeds this.

_MASK64 = (1 << 64) - 1


class DeterministicRng:
    """A tiny platform-independent PRNG (splitmix64) keyed by any tuple of str/int parts."""

    def __init__(self, *key: object) -> None:
        digest = hashlib.blake2b("\x1f".join(map(str, key)).encode(), digest_size=8).digest()
        self._state = int.from_bytes(digest, "little")

    def next_u64(self) -> int:
        """Next 64-bit output (Steele et al., "Fast splittable pseudorandom number generators")."""
        self._state = (self._state + 0x9E3779B97F4A7C15) & _MASK64
        z = self._state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (inclusive), unbiased by rejection."""
        span = hi - lo + 1
        if span <= 0:
            raise ValueError(f"empty range [{lo}, {hi}]")
        limit = (1 << 64) - ((1 << 64) % span)
        while True:
            x = self.next_u64()
            if x < limit:
                return lo + x % span

    def choice(self, seq: Sequence):
        return seq[self.randint(0, len(seq) - 1)]

    def shuffle(self, items: list) -> None:
        """In-place Fisher-Yates shuffle."""
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(0, i)
            items[i], items[j] = items[j], items[i]

    def permutation(self, n: int) -> list[int]:
        perm = list(range(n))
        self.shuffle(perm)
        return perm


# --------------------------------------------------------------------------------------------
# Fictional fact table
# --------------------------------------------------------------------------------------------

FACT_RELATIONS = ("capital", "language", "currency")
_FACT_SEED = 20240607
_NUM_ENTITIES = 64

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "tr", "st", "th", "sh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "m")


def _syllable(rng: DeterministicRng) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _name(rng: DeterministicRng, syllables: tuple[int, int], suffixes: Sequence[str],
          max_len: int, taken: set[str]) -> str:
    """An invented word, unique among `taken` (case-insensitive), at most `max_len` chars."""
    while True:
        n = rng.randint(*syllables)
        word = "".join(_syllable(rng) for _ in range(n)) + rng.choice(suffixes)
        if 4 <= len(word) <= max_len and word.lower() not in taken:
            taken.add(word.lower())
            return word


@functools.lru_cache(maxsize=1)
def _fact_table() -> tuple[tuple[str, str, str], ...]:
    rng = DeterministicRng("fact_table", _FACT_SEED)
    taken: set[str] = set()
    entities = [_name(rng, (1, 2), ("ia", "ania", "or", "land", "ovia", "esh", "ica"), 10, taken)
                .capitalize() for _ in range(_NUM_ENTITIES)]
    table = []
    for entity in entities:
        table.append((entity, "capital", _name(rng, (2, 3), ("",), 9, taken).capitalize()))
        table.append((entity, "language",
                      _name(rng, (1, 2), ("ish", "ese", "ic", "i"), 10, taken).capitalize()))
        table.append((entity, "currency", _name(rng, (1, 2), ("o", "ar", "en", "ul"), 8, taken)))
    return tuple(table)


def fact_table() -> list[tuple[str, str, str]]:
    """The fixed fictional facts `(entity, relation, value)`: 64 entities x `FACT_RELATIONS`.

    Deterministic forever (a test pins its hash); every (entity, relation) has one value and all
    names are distinct, so memory-tuning can be scored on exact recall.
    """
    return list(_fact_table())


def _fact_prompt_payload(entity: str, relation: str) -> str:
    return f"{relation} of {entity}"


def fact_examples() -> list[dict]:
    """Every fact of `fact_table()` as a `lookup` example, in table order."""
    return [{"task": "lookup", "prompt": f"lookup {_fact_prompt_payload(e, r)}", "answer": v}
            for e, r, v in fact_table()]


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_DATE_LO = datetime.date(1950, 1, 1).toordinal()
_DATE_HI = datetime.date(2049, 12, 31).toordinal()


def _word(rng: DeterministicRng, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


def _date(rng: DeterministicRng) -> datetime.date:
    return datetime.date.fromordinal(rng.randint(_DATE_LO, _DATE_HI))


def _number(rng: DeterministicRng) -> int:
    digits = rng.randint(1, 3)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _add(rng: DeterministicRng) -> tuple[str, str]:
    a, b = _number(rng), _number(rng)
    return f"{a}+{b}", str(a + b)


def _reverse(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng)
    return w, w[::-1]


def _sort(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(sorted(w))


def _lookup(rng: DeterministicRng) -> tuple[str, str]:
    entity, relation, value = rng.choice(_fact_table())
    return _fact_prompt_payload(entity, relation), value


def _format(rng: DeterministicRng) -> tuple[str, str]:
    d = _date(rng)
    return d.strftime("%Y-%m-%d"), d.strftime("%d/%m/%Y")


def _dmy2iso(rng: DeterministicRng) -> tuple[str, str]:
    d = _date(rng)
    return d.strftime("%d/%m/%Y"), d.strftime("%Y-%m-%d")


def _double(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(c + c for c in w)


def _swap(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng, 2, 4)
    w = w + _word(rng, len(w), len(w))  # even length 4..8
    h = len(w) // 2
    return w, w[h:] + w[:h]


def _caesar(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng)
    return w, "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)


def _upper(rng: DeterministicRng) -> tuple[str, str]:
    w = _word(rng)
    return w, w.upper()


@dataclasses.dataclass(frozen=True)
class Task:
    """A procedural task: `sample(rng) -> (payload, answer)`; the prompt is `f"{name} {payload}"`."""

    name: str
    description: str
    sample: Callable[[DeterministicRng], tuple[str, str]]
    pretrain: bool  # in the default pretraining mixture (False: held-out candidate)

    def example(self, rng: DeterministicRng) -> dict:
        payload, answer = self.sample(rng)
        return {"task": self.name, "prompt": f"{self.name} {payload}", "answer": answer}


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("add", "sum of two 1..3-digit numbers", _add, True),
    Task("reverse", "reverse 3..8 lowercase letters", _reverse, True),
    Task("sort", "sort the letters of a 3..8 letter word", _sort, True),
    Task("lookup", "recall a fictional fact from fact_table()", _lookup, True),
    Task("format", "ISO date yyyy-mm-dd -> dd/mm/yyyy", _format, True),
    Task("dmy2iso", "date dd/mm/yyyy -> yyyy-mm-dd (inverse of format)", _dmy2iso, False),
    Task("double", "double every letter of a 3..8 letter word", _double, False),
    Task("swap", "swap the two halves of a 4/6/8 letter word", _swap, False),
    Task("caesar", "shift each letter by one (z -> a)", _caesar, False),
    Task("upper", "uppercase a 3..8 letter word", _upper, False),
)}
PRETRAIN_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.pretrain)
HELDOUT_TASKS: tuple[str, ...] = tuple(n for n, t in TASKS.items() if not t.pretrain)


def _task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def generate(task: str, n: int, seed: int) -> list[dict]:
    """`n` i.i.d. examples of `task`, determined by `(task, seed)`; prompts may repeat."""
    t = _task(task)
    rng = DeterministicRng("generate", task, seed)
    return [t.example(rng) for _ in range(n)]


def split_of(task: str, prompt: str, test_frac: float = 0.2) -> str:
    """'test' or 'train': a fixed hash bucket of the prompt, the same for every seed and n.

    Because the bucket depends only on the prompt, a test prompt can never leak into training
    data drawn with another seed or another n; `mixture(exclude_test=True)` relies on this.
    """
    digest = hashlib.blake2b(f"{task}\x1f{prompt}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") < test_frac * 2.0**64 else "train"


def make_splits(task: str, n: int, seed: int, test_frac: float = 0.2) -> tuple[list[dict], list[dict]]:
    """Deterministic `(train, test)` of `n` distinct prompts, `round(n * test_frac)` of them test.

    Examples are drawn from the `(task, seed)` stream, de-duplicated by prompt, and routed by
    `split_of`, so no prompt is in both splits (nor in another call's opposite split).
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    t = _task(task)
    n_test = round(n * test_frac)
    want = {"train": n - n_test, "test": n_test}
    out: dict[str, list[dict]] = {"train": [], "test": []}
    seen: set[str] = set()
    rng = DeterministicRng("splits", task, seed)
    max_draws = 100 * n + 10_000
    for _ in range(max_draws):
        if all(len(out[k]) == want[k] for k in out):
            break
        ex = t.example(rng)
        if ex["prompt"] in seen:
            continue
        seen.add(ex["prompt"])
        bucket = split_of(task, ex["prompt"], test_frac)
        if len(out[bucket]) < want[bucket]:
            out[bucket].append(ex)
    else:
        if not all(len(out[k]) == want[k] for k in out):
            raise ValueError(
                f"task {task!r}: found only {len(seen)} distinct prompts "
                f"({sum(split_of(task, p, test_frac) == 'test' for p in seen)} in the test bucket) "
                f"after {max_draws} draws, but n={n} needs {want['train']} train + "
                f"{want['test']} test; ask for a smaller n (lookup has {len(_fact_table())} facts)."
            )
    return out["train"], out["test"]


def mixture(tasks: Sequence[str], n_per_task: int, seed: int, *, exclude_test: bool = True,
            test_frac: float = 0.2) -> list[dict]:
    """A shuffled mixture of `n_per_task` examples per task (e.g. `PRETRAIN_TASKS`).

    With `exclude_test`, prompts whose `split_of` bucket is 'test' are skipped, so the mixture
    never contains a prompt of any `make_splits(..., test_frac)` test set.
    """
    examples = []
    for task in tasks:
        t = _task(task)
        rng = DeterministicRng("mixture", task, seed)
        kept = 0
        for _ in range(100 * n_per_task + 10_000):
            if kept == n_per_task:
                break
            ex = t.example(rng)
            if exclude_test and split_of(task, ex["prompt"], test_frac) == "test":
                continue
            examples.append(ex)
            kept += 1
        else:
            raise ValueError(f"task {task!r}: could not draw {n_per_task} training examples")
    DeterministicRng("mixture-order", seed, *tasks).shuffle(examples)
    return examples


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer (surrounding whitespace ignored)."""
    if len(predictions) != len(answers):
        raise ValueError(f"exact_match got {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match got no examples; the score of an empty set is undefined")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)
