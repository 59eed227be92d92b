"""The check character of generated codes: a Damm-style scheme over GF(32).

A generated code is ``prefix + random symbols + one check symbol``. Symbols
come from Crockford's base32 alphabet (digits and letters without I, L, O,
U), read as the 32 elements of the field GF(2^5) by their position in it.

The check runs the quasigroup ``x * y = ALPHA*x + y`` (``+`` is XOR in
GF(2^5), ``ALPHA`` the field element 2, i.e. the polynomial ``t``, reduced by
``t^5 + t^2 + 1``) along the symbols from 0, the way Damm's algorithm does;
the check symbol is the one that brings the chain back to 0, so a code is
well formed when its chain over random symbols *and* check symbol ends at 0.

Why this detects what people get wrong when they type a code:
- every single substitution, at any position, the check symbol included:
  each row and each column of ``*`` is a permutation (ALPHA is invertible),
  so a different symbol changes the chain from there on and it cannot end
  at 0;
- every adjacent transposition, the check symbol included:
  ``(c*x)*y == (c*y)*x`` means ``(ALPHA + 1)(x + y) == 0``, and ALPHA != 1,
  so only ``x == y`` (the quasigroup is totally anti-symmetric).
Both properties of the table are checked exhaustively in
tests/unit/test_code_check.py. (As a sum, a code's chain is
``sum(s_i * ALPHA^(n-i))``: ALPHA has order 31, so even transpositions of
symbols up to 30 positions apart are caught.)

The prefix is not part of the check: it is the batch's, matched exactly, so
a code with a mistyped prefix does not belong to the batch at all.

Bulk generation (``random_code_block``) works on whole columns of bytes with
``bytes.translate`` and big-integer XOR; ``sorted_codes`` orders a batch a
thirty-second at a time, so a million codes cost about a second of Python,
spread over the time PostgreSQL takes to store them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

# Crockford's base32: no I, L, O, U (I, L and O look like 1 and 0; U avoids
# accidental words). 32 symbols, so a random byte masked to 5 bits is an
# unbiased symbol (256 is a multiple of 32).
ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BITS_PER_SYMBOL = 5
_MODULUS = 0b100101  # t^5 + t^2 + 1, irreducible over GF(2)
_SYMBOLS = frozenset(ALPHABET)
_VALUE = {symbol: value for value, symbol in enumerate(ALPHABET)}


def _times_alpha(value: int) -> int:
    value <<= 1
    return value ^ _MODULUS if value & 0b100000 else value


def combine(interim: int, symbol_value: int) -> int:
    """One step of the chain: the quasigroup ``interim * symbol``."""
    return _times_alpha(interim) ^ symbol_value


# Byte tables for bytes.translate: 5-bit value -> ALPHA * value, a random
# byte -> its low 5 bits, a value -> its symbol.
_TIMES_ALPHA = bytes(_times_alpha(b & 31) for b in range(256))
_FIVE_BITS = bytes(b & 31 for b in range(256))
_SYMBOL_OF_VALUE = bytes(ord(ALPHABET[b & 31]) for b in range(256))


def check_symbol(symbols: str) -> str:
    """The check symbol of ``symbols`` (all from ALPHABET)."""
    interim = 0
    for symbol in symbols:
        interim = combine(interim, _VALUE[symbol])
    # interim * c == 0  <=>  c == ALPHA * interim (XOR is its own inverse).
    return ALPHABET[_times_alpha(interim)]


def is_well_formed(symbols_and_check: str) -> bool:
    """Whether random symbols followed by their check symbol chain to 0."""
    interim = 0
    for symbol in symbols_and_check:
        value = _VALUE.get(symbol)
        if value is None:
            return False
        interim = combine(interim, value)
    return interim == 0


def random_bits(length: int) -> int:
    return BITS_PER_SYMBOL * length


@dataclass(frozen=True)
class CodeShape:
    """What every code of a generated batch looks like: prefix, random symbols, check."""

    prefix: str
    length: int  # random symbols, the check symbol not counted

    def has_shape(self, code: str) -> bool:
        """Prefix, length and alphabet of this batch (the check not verified)."""
        return (
            len(code) == len(self.prefix) + self.length + 1
            and code.startswith(self.prefix)
            and _SYMBOLS.issuperset(code[len(self.prefix) :])
        )

    def is_mistyped(self, code: str) -> bool:
        """Shaped like this batch's codes but with a check symbol that does not fit."""
        return self.has_shape(code) and not is_well_formed(code[len(self.prefix) :])


def random_code_block(count: int, prefix: str, length: int, *, first: int | None = None) -> bytes:
    """``count`` codes of ``prefix + length random symbols + check``, back to back (ASCII).

    Every code is ``len(prefix) + length + 1`` bytes; there is no separator.
    The symbols come from the operating system's CSPRNG; ``first`` (a symbol
    value) fixes the first random symbol instead. Repeats are possible
    (``sorted_codes`` makes a batch of distinct ones).
    """
    if count <= 0:
        return b""
    values = os.urandom(count * length).translate(_FIVE_BITS)
    columns = [values[j::length] for j in range(length)]
    if first is not None:
        columns[0] = bytes([first]) * count
    # The chain for all codes at once, one column (symbol position) at a time.
    interim = bytes(count)
    for column in columns:
        stepped = int.from_bytes(interim.translate(_TIMES_ALPHA), "little") ^ int.from_bytes(column, "little")
        interim = stepped.to_bytes(count, "little")
    check = interim.translate(_TIMES_ALPHA)
    width = len(prefix) + length + 1
    block = bytearray(prefix.encode("ascii") + b"\0" * (length + 1)) * count
    for j, column in enumerate(columns):
        block[len(prefix) + j :: width] = column.translate(_SYMBOL_OF_VALUE)
    block[width - 1 :: width] = check.translate(_SYMBOL_OF_VALUE)
    return bytes(block)


# Rounds in a row that bring a group no new code before it is left short. One
# was too few: redrawing the last few codes of a small space can all collide
# by chance (a unit test of 4 symbols missed one code in 20,000 once).
_FRUITLESS_ROUNDS = 8


def sorted_codes(count: int, prefix: str, length: int, *, piece: int = 16_384) -> Iterator[bytes]:
    """``count`` distinct random codes in ascending order, ``piece`` codes at a time (blocks as above).

    Ascending, so that PostgreSQL inserts them into the primary-key B-tree
    leaf after leaf, each page filled once, instead of at random places all
    over it (what a bare COPY of random codes pays: with a million codes
    its index no longer stays in shared buffers). Without sorting the batch
    as a whole before the first code can go: the codes are drawn by their
    first random symbol, 32 groups in the alphabet's order (which is ASCII
    order). How many codes each group gets is drawn first, one random
    symbol per code, so the batch is as if every code had been drawn whole;
    each group is then drawn, made distinct and sorted on its own (a
    thirty-second of the batch) when its turn comes, while PostgreSQL takes
    the groups before it.

    A group whose draws bring no new code ``_FRUITLESS_ROUNDS`` times in a
    row (only a nearly exhausted code space: never with the space
    ``catalog.rules`` requires) is left short; the caller draws what is
    missing again.
    """
    width = len(prefix) + length + 1
    firsts = os.urandom(count).translate(_FIVE_BITS)
    for first in range(len(ALPHABET)):
        wanted = firsts.count(first)
        group: set[str] = set()
        fruitless = 0
        while len(group) < wanted and fruitless < _FRUITLESS_ROUNDS:
            before = len(group)
            group.update(split_block(random_code_block(wanted - before, prefix, length, first=first), width))
            fruitless = fruitless + 1 if len(group) == before else 0
        ordered = sorted(group)
        for start in range(0, len(ordered), piece):
            yield "".join(ordered[start : start + piece]).encode("ascii")


def split_block(block: bytes, width: int) -> list[str]:
    """The codes of a block as strings (the slow path only: collisions, tests)."""
    text = block.decode("ascii")
    return [text[start : start + width] for start in range(0, len(text), width)]
