"""Record cleaning: unicode normalisation, PII masking, exact and MinHash near-duplicate
removal, and length filters. Every removal comes with a reason (see `REASONS`).

Pieces, usable alone or through `Cleaner` (what `pipeline.prepare` calls, one example at a
time, in source order):

    normalize_text(text, ...)          NFKC, control characters, whitespace
    mask_pii(text, kinds) -> (text, counts)   <EMAIL> <PHONE> <IPV4> <IPV6> placeholders
    clean_text(text, ...) -> (text, counts)   both of the above
    map_text(example, fn)              applies fn to every text field of a canonical example
    example_text(example)              all text fields and roles joined (exact-dedup key)
    content_text(example)              the contents only (what MinHash shingles)
    ExactDedup / MinHashDedup          `.add(text) -> index of the earlier kept duplicate | None`
    LengthFilter                       `.check_chars(text)` / `.check_tokens(n)` -> reason | None

Layering: nothing here imports `ftjax.models`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
import unicodedata
import zlib
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from ftjax.data.errors import DataError

__all__ = [
    "REASONS", "PII_KINDS", "PLACEHOLDERS", "WHITESPACE_MODES", "normalize_text", "mask_pii",
    "clean_text", "map_text", "example_text", "content_text", "dedup_key", "ExactDedup", "MinHashDedup",
    "shingles", "lsh_params", "LengthFilter", "CleanConfig", "Cleaner",
]

# Why an example was dropped; `DataReport` counts drops under these names.
REASONS = ("empty", "exact_duplicate", "near_duplicate", "too_short_chars", "too_long_chars",
           "too_short_tokens", "too_long_tokens")

# ------------------------------------------------------------------------------------------
# Unicode and whitespace
# ------------------------------------------------------------------------------------------

WHITESPACE_MODES = ("normalize", "collapse", "keep")
# Invisible format characters that carry no meaning in training text (zero-width space, word
# joiner, byte-order mark, soft hyphen). ZWJ/ZWNJ are kept: scripts and emoji sequences use them.
_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u2060\ufeff\u00ad"))
_HSPACE = re.compile(r"[^\S\n]+")           # whitespace other than newline
_TRAILING = re.compile(r"[^\S\n]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")


# Unicode category Cc is exactly U+0000-U+001F and U+007F-U+009F.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_OTHER_SPACE = re.compile(r"[^\S\t\n ]")  # whitespace other than tab, newline and ' '


def _strip_controls(text: str) -> str:
    """Drops C0/C1 control characters except tab and newline, and the invisible ones above."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_INVISIBLE)
    return _CONTROL.sub("", text)


def normalize_text(text: str, *, nfkc: bool = True, strip_control: bool = True,
                   whitespace: str = "normalize") -> str:
    """Unicode NFKC, control characters removed, whitespace normalised.

    whitespace: "normalize" (unicode spaces -> ' ', trailing spaces per line and 3+ newlines
    removed, ends stripped; indentation kept, so code survives), "collapse" (additionally every
    run of spaces/tabs becomes one space) or "keep".
    """
    if whitespace not in WHITESPACE_MODES:
        raise DataError(f"whitespace={whitespace!r} is not known; choose one of {WHITESPACE_MODES}")
    if nfkc:
        text = unicodedata.normalize("NFKC", text)
    if strip_control:
        text = _strip_controls(text)
    if whitespace == "keep":
        return text
    if whitespace == "collapse":
        text = _HSPACE.sub(" ", text)
    else:  # NFKC already maps NBSP & co. to ' '; do it here too when nfkc is off
        text = _OTHER_SPACE.sub(" ", text)
    text = _TRAILING.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


# ------------------------------------------------------------------------------------------
# PII masking
# ------------------------------------------------------------------------------------------

PII_KINDS = ("email", "ipv6", "ipv4", "phone")  # masking order: IPs before phone numbers
PLACEHOLDERS = {"email": "<EMAIL>", "phone": "<PHONE>", "ipv4": "<IPV4>", "ipv6": "<IPV6>"}

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)(?!\w)")
# Candidates only; `ipaddress` decides (rejects times like 12:30:45 and MAC addresses).
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}"
                   r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{0,4})(?:%\w+)?(?![\w:])")
# Optional +country code, optional (area), then 2..6 digit groups joined by space, '-' or '.'.
_PHONE = re.compile(r"(?<![\w+.\-/])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,5}\)[ .-]?)?"
                    r"\d{1,5}(?:[ .-]\d{1,5}){1,5}(?![\w/]|[.-]\d)"
                    r"|(?<![\w+.\-/])\+\d{7,15}(?!\w)")
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$")
_LOCAL7 = re.compile(r"^\d{3}[ .-]\d{4}$")


def _is_phone(s: str) -> bool:
    """Shape check on a phone candidate: 7..15 digits (E.164), not a date, and an
    international prefix, an (area code), two or more separators, or the local 555-0123 form.
    Bare digit runs are never masked (order numbers, timestamps)."""
    digits = sum(c.isdigit() for c in s)
    if not 7 <= digits <= 15 or _DATE.match(s):
        return False
    if s.startswith("+") or "(" in s:
        return True
    seps = re.findall(r"[ .-]", s)
    if len(seps) >= 2:
        return len(set(seps)) == 1  # one separator style: "555 123 4567", "555.123.4567"
    return bool(_LOCAL7.match(s))


def _valid_ipv6(s: str) -> bool:
    if not any(c in "0123456789abcdefABCDEF" for c in s):
        return False
    try:
        ipaddress.IPv6Address(s.split("%", 1)[0])
        return True
    except ValueError:
        return False


_CHECKS: dict[str, tuple[re.Pattern, Optional[Callable[[str], bool]]]] = {
    "email": (_EMAIL, None), "ipv6": (_IPV6, _valid_ipv6), "ipv4": (_IPV4, None),
    "phone": (_PHONE, _is_phone),
}
_HAS_DIGIT = re.compile(r"\d")
# Cheap tests that rule a kind out before its regex runs.
_MAYBE: dict[str, Callable[[str], bool]] = {
    "email": lambda t: "@" in t, "ipv6": lambda t: "::" in t or t.count(":") >= 6,
    "ipv4": lambda t: "." in t and _HAS_DIGIT.search(t) is not None,
    "phone": lambda t: _HAS_DIGIT.search(t) is not None,
}


def mask_pii(text: str, kinds: Iterable[str] = PII_KINDS) -> tuple[str, Counter]:
    """Replaces e-mail addresses, IPv6/IPv4 addresses and phone numbers by typed placeholders.

    Returns the masked text and a Counter of replacements per kind. Masking runs in the fixed
    order of `PII_KINDS` (an IPv4 address is never read as a phone number).
    """
    kinds = set(kinds)
    unknown = kinds - set(PII_KINDS)
    if unknown:
        raise DataError(f"unknown PII kinds {sorted(unknown)}; choose from {PII_KINDS}")
    counts: Counter = Counter()
    for kind in PII_KINDS:
        if kind not in kinds or not _MAYBE[kind](text):
            continue
        pattern, valid = _CHECKS[kind]

        def sub(m: re.Match, kind=kind, valid=valid) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]
        text = pattern.sub(sub, text)
    return text, counts


def clean_text(text: str, *, nfkc: bool = True, strip_control: bool = True,
               whitespace: str = "normalize",
               pii: Iterable[str] = PII_KINDS) -> tuple[str, Counter]:
    """`normalize_text` then `mask_pii` (pii=() disables masking); returns (text, PII counts)."""
    text = normalize_text(text, nfkc=nfkc, strip_control=strip_control, whitespace=whitespace)
    return mask_pii(text, pii) if pii else (text, Counter())


# ------------------------------------------------------------------------------------------
# Canonical examples
# ------------------------------------------------------------------------------------------

_NON_TEXT_KEYS = frozenset({"role", "label"})


def map_text(example: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a canonical example with `fn` applied to every text field (message contents,
    "text", prompt/chosen/rejected/completion); roles and labels are left alone."""
    if isinstance(example, str):
        return fn(example)
    if isinstance(example, Mapping):
        return {k: (v if k in _NON_TEXT_KEYS else map_text(v, fn)) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return [map_text(v, fn) for v in example]
    return example


def example_text(example: Any) -> str:
    """Every text field of a canonical example, in a fixed order, joined with separators
    (message roles included, labels not): what deduplication and char-length filters see."""
    parts: list[str] = []

    def walk(x: Any, key: str = "") -> None:
        if isinstance(x, str):
            parts.append(f"{key}\x1f{x}")
        elif isinstance(x, Mapping):
            for k in sorted(x):
                if k == "label":
                    continue
                walk(x[k], k)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v, key)
    walk(example)
    return "\x1e".join(parts)


def content_text(example: Any) -> str:
    """The text fields' contents alone (no field names or roles), newline-joined in the
    order of `example_text`: what MinHash shingles, so that the shared structure of chat
    examples does not make short, different conversations look alike."""
    parts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, str):
            parts.append(x)
        elif isinstance(x, Mapping):
            for k in sorted(x):
                if k not in _NON_TEXT_KEYS:
                    walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(example)
    return "\n".join(parts)


def _text_chars(example: Any) -> int:
    """Characters of content (roles and field names not counted)."""
    n = [0]
    map_text(example, lambda s: n.__setitem__(0, n[0] + len(s)) or s)
    return n[0]


# ------------------------------------------------------------------------------------------
# Exact deduplication
# ------------------------------------------------------------------------------------------

def dedup_key(text: str) -> bytes:
    """Hash of the text after NFKC, case folding and whitespace collapsing (16 bytes)."""
    t = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return hashlib.blake2b(t.encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers the normalised-text hash of every kept example."""

    def __init__(self) -> None:
        self._first: dict[bytes, int] = {}
        self._n = 0

    def lookup(self, text: str) -> Optional[int]:
        """The index of a remembered example with the same normalised text, or None."""
        return self._first.get(dedup_key(text))

    def add(self, text: str, index: Optional[int] = None) -> Optional[int]:
        """Registers an example under `index` (default: the count of earlier `add` calls);
        returns the index of the earlier example it duplicates, or None when it is new (and
        now remembered)."""
        key = dedup_key(text)
        i = self._n if index is None else index
        self._n += 1
        first = self._first.get(key)
        if first is None:
            self._first[key] = i
        return first


# ------------------------------------------------------------------------------------------
# MinHash + LSH near-duplicate detection (Broder 1997; banding as in Leskovec et al.,
# "Mining of Massive Datasets", ch. 3)
# ------------------------------------------------------------------------------------------

_PRIME = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)


def shingles(text: str, kind: str = "word", n: int = 3) -> set[str]:
    """Word n-grams (of the lower-cased word sequence) or character n-grams (whitespace
    collapsed). A text shorter than one n-gram is a single shingle."""
    if n < 1:
        raise DataError(f"shingle size must be >= 1, got {n}")
    if kind == "word":
        toks = re.findall(r"\w+", text.lower())
        if len(toks) < n:
            return {" ".join(toks)}
        return {" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)}
    if kind == "char":
        t = " ".join(text.lower().split())
        if len(t) < n:
            return {t}
        return {t[i:i + n] for i in range(len(t) - n + 1)}
    raise DataError(f"shingle kind {kind!r} is not known; use 'word' or 'char'")


def _candidate_probability(s: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """P(two texts with Jaccard s share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - s ** rows) ** bands


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the false-positive area below
    the threshold plus the false-negative area above it of the banding S-curve."""
    grid = np.linspace(0.0, 1.0, 1001)
    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if r < 1:
            break
        p = _candidate_probability(grid, b, r)
        lo, hi = grid <= threshold, grid >= threshold
        err = np.trapezoid(p[lo], grid[lo]) + np.trapezoid(1.0 - p[hi], grid[hi])
        if err < best_err - 1e-12:
            best, best_err = (b, r), err
    return best


def _hash32(items: Iterable[str]) -> np.ndarray:
    """CRC-32 of each shingle: deterministic across runs (unlike `hash`) and fast; the
    universal hashes on top of it make the MinHash permutations."""
    return np.fromiter((zlib.crc32(s.encode("utf-8")) for s in items), np.uint64)


class MinHashDedup:
    """Near-duplicate filter: MinHash signatures, LSH banding for candidates, then a check of
    the estimated Jaccard similarity against `threshold` (so banding only decides recall).

    threshold: Jaccard similarity of shingle sets at or above which a text duplicates an
    earlier kept one. num_perm: signature length (the estimate's std is sqrt(J(1-J)/num_perm)).
    bands: LSH bands (rows = num_perm // bands); None picks them for the threshold
    (`lsh_params`). seed: the hash permutations; everything is deterministic.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: Optional[int] = None,
                 seed: int = 0, shingle: str = "word", ngram: int = 3) -> None:
        if not 0.0 < threshold <= 1.0:
            raise DataError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
        if num_perm < 2:
            raise DataError(f"num_perm must be >= 2, got {num_perm}")
        if bands is None:
            bands, rows = lsh_params(threshold, num_perm)
        else:
            if not 1 <= bands <= num_perm:
                raise DataError(f"bands={bands} must be in [1, num_perm={num_perm}]")
            rows = num_perm // bands
        self.threshold, self.num_perm, self.bands, self.rows = threshold, num_perm, bands, rows
        self.shingle, self.ngram = shingle, ngram
        shingles("", shingle, ngram)  # validates kind and size up front
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6D696E68]))
        # h_i(x) = (a_i x + b_i) mod p with p = 2^61 - 1 > 2^32 > x: a universal family.
        # a, b < 2^32 keep a*x + b below 2^64, so uint64 arithmetic is exact.
        self._a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
        self._buckets: list[dict[bytes, list[int]]] = [dict() for _ in range(bands)]
        self._sigs: list[np.ndarray] = []   # kept signatures
        self._ids: list[int] = []           # their `add` indices
        self._n = 0

    def signature(self, text: str) -> np.ndarray:
        """uint32 MinHash signature [num_perm] of the text's shingle set."""
        x = _hash32(sorted(shingles(text, self.shingle, self.ngram)))
        h = (np.multiply.outer(x, self._a) + self._b) % _PRIME & _MASK32
        return h.min(axis=0).astype(np.uint32)

    @staticmethod
    def jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
        """Estimated Jaccard similarity: the fraction of equal signature slots."""
        return float(np.mean(sig_a == sig_b))

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        r = self.rows
        return [sig[i * r:(i + 1) * r].tobytes() for i in range(self.bands)]

    def add(self, text: str, index: Optional[int] = None) -> Optional[int]:
        """Registers an example under `index` (default: the count of earlier `add` calls);
        returns the index of the most similar earlier kept example with estimated Jaccard >=
        threshold, or None (the text is kept and indexed). Dropped texts are not indexed, so
        a chain of small edits does not cascade."""
        sig = self.signature(text)
        i = self._n if index is None else index
        self._n += 1
        keys = self._band_keys(sig)
        cands: set[int] = set()
        for band, key in zip(self._buckets, keys):
            cands.update(band.get(key, ()))
        best, best_j = None, -1.0
        for k in sorted(cands):
            j = self.jaccard(sig, self._sigs[k])
            if j >= self.threshold and j > best_j:
                best, best_j = self._ids[k], j
        if best is not None:
            return best
        slot = len(self._sigs)
        self._sigs.append(sig)
        self._ids.append(i)
        for band, key in zip(self._buckets, keys):
            band.setdefault(key, []).append(slot)
        return None


# ------------------------------------------------------------------------------------------
# Length filters
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LengthFilter:
    """Min/max length in characters (of the text fields) or tokens (after tokenization, by the
    pipeline). 0 / None disable a bound."""

    min_chars: int = 0
    max_chars: Optional[int] = None
    min_tokens: int = 0
    max_tokens: Optional[int] = None

    def check_chars(self, text_or_example: Any) -> Optional[str]:
        """'too_short_chars' / 'too_long_chars' / None for a text or a canonical example."""
        n = len(text_or_example) if isinstance(text_or_example, str) else _text_chars(
            text_or_example)
        if n < self.min_chars:
            return "too_short_chars"
        if self.max_chars is not None and n > self.max_chars:
            return "too_long_chars"
        return None

    def check_tokens(self, n_tokens: int) -> Optional[str]:
        """'too_short_tokens' / 'too_long_tokens' / None for a token count."""
        if n_tokens < self.min_tokens:
            return "too_short_tokens"
        if self.max_tokens is not None and n_tokens > self.max_tokens:
            return "too_long_tokens"
        return None


# ------------------------------------------------------------------------------------------
# All of it, one example at a time
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CleanConfig:
    """Cleaning options (a config's `data.clean` section; `from_config` reads it)."""

    nfkc: bool = True
    strip_control: bool = True
    whitespace: str = "normalize"
    pii: tuple[str, ...] = PII_KINDS          # () disables masking
    exact_dedup: bool = True
    near_dup_threshold: float = 0.0           # 0 disables MinHash near-duplicate removal
    num_perm: int = 128
    bands: Optional[int] = None
    shingle: str = "word"
    ngram: int = 3
    min_chars: int = 1
    max_chars: Optional[int] = None
    min_tokens: int = 0
    max_tokens: Optional[int] = None
    seed: int = 0

    @classmethod
    def from_config(cls, section: Any) -> "CleanConfig":
        """From a dict / ConfigDict; unknown keys are an error (typos must not pass silently).
        `pii` may be a bool, a "+"/","-separated string or a list of kinds."""
        if section is None:
            return cls()
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DataError(f"unknown data.clean options {unknown}; known: {sorted(names)}")
        pii = d.get("pii", PII_KINDS)
        if pii is True:
            pii = PII_KINDS
        elif pii in (False, None, ""):
            pii = ()
        elif isinstance(pii, str):
            pii = tuple(p for p in re.split(r"[+,\s]+", pii) if p)
        d["pii"] = tuple(pii)
        for k in ("max_chars", "max_tokens", "bands"):
            if d.get(k) in (0, -1):
                d[k] = None
        out = cls(**d)
        mask_pii("", out.pii)                # validates kinds
        normalize_text("", whitespace=out.whitespace)
        return out

    def length_filter(self) -> LengthFilter:
        return LengthFilter(self.min_chars, self.max_chars, self.min_tokens, self.max_tokens)


class Cleaner:
    """Cleans, length-filters and deduplicates a stream of canonical examples.

    `process(example) -> (cleaned, None)` for a kept example or `(None, reason)` for a dropped
    one. Order of checks: empty, character length, exact duplicate, near duplicate; only kept
    examples are remembered by the deduplicators. Dedup state spans
    every call, so examples of all sources and splits dedup against each other when they go
    through one Cleaner. `pii_counts` totals masked items per kind.
    """

    def __init__(self, config: CleanConfig = CleanConfig()) -> None:
        self.config = config
        self.lengths = config.length_filter()
        self.exact = ExactDedup() if config.exact_dedup else None
        self.near = (MinHashDedup(config.near_dup_threshold, config.num_perm, config.bands,
                                  config.seed, config.shingle, config.ngram)
                     if config.near_dup_threshold > 0 else None)
        self.pii_counts: Counter = Counter()
        self.duplicate_of: dict[int, int] = {}  # process index -> kept index it duplicates
        self._n = 0

    def clean(self, example: Any) -> tuple[Any, Counter]:
        """Normalised and PII-masked copy of an example, plus the PII counts (no state)."""
        counts: Counter = Counter()
        c = self.config

        def one(s: str) -> str:
            out, n = clean_text(s, nfkc=c.nfkc, strip_control=c.strip_control,
                                whitespace=c.whitespace, pii=c.pii)
            counts.update(n)
            return out
        return map_text(example, one), counts

    def process(self, example: Any) -> tuple[Optional[Any], Optional[str]]:
        """(cleaned example, None) when kept, (None, reason) when dropped; examples are
        numbered in call order (`duplicate_of` uses these numbers)."""
        i, self._n = self._n, self._n + 1
        ex, counts = self.clean(example)
        if _text_chars(ex) == 0:
            return None, "empty"
        reason = self.lengths.check_chars(ex)
        if reason:
            return None, reason
        text = example_text(ex)
        j = self.exact.lookup(text) if self.exact is not None else None
        if j is not None:
            self.duplicate_of[i] = j
            return None, "exact_duplicate"
        j = self.near.add(content_text(ex), i) if self.near is not None else None
        if j is not None:
            self.duplicate_of[i] = j
            return None, "near_duplicate"
        if self.exact is not None:  # registered only once kept
            self.exact.add(text, i)
        self.pii_counts.update(counts)
        return ex, None
