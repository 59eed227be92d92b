"""The check symbol of generated codes: its two promises, proved exhaustively."""

from __future__ import annotations

import itertools
import random

from services.attribution.common import code_check
from services.attribution.common.code_check import ALPHABET, CodeShape, combine
from services.attribution.common.coupon_rules import missing_code_reason
from services.attribution.common.reasons import COUPON_MISTYPED, UNKNOWN_COUPON

N = len(ALPHABET)


def test_the_alphabet_is_crockfords_base32() -> None:
    assert ALPHABET == "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    assert len(set(ALPHABET)) == 32 and not set("ILOU") & set(ALPHABET)


def test_the_operation_is_a_quasigroup() -> None:
    """Every row and every column of x * y is a permutation (32 x 32, all of them).

    So a single substituted symbol changes the chain at its position, and a
    changed chain stays changed through every later symbol: the code can no
    longer chain to 0. That is the single-substitution proof for any length.
    """
    for x in range(N):
        assert sorted(combine(x, y) for y in range(N)) == list(range(N))
        assert sorted(combine(y, x) for y in range(N)) == list(range(N))


def test_the_operation_is_totally_anti_symmetric() -> None:
    """(c * x) * y == (c * y) * x only when x == y, for every c, x, y (32^3 cases).

    So swapping two different neighbours changes the chain after the pair,
    wherever the pair is: the adjacent-transposition proof for any length.
    """
    for c, x, y in itertools.product(range(N), repeat=3):
        if x != y:
            assert combine(combine(c, x), y) != combine(combine(c, y), x), (c, x, y)


def _errors(word: str) -> list[str]:
    """Every single substitution and every adjacent transposition of ``word``."""
    typos = [word[:i] + s + word[i + 1 :] for i in range(len(word)) for s in ALPHABET if s != word[i]]
    typos += [word[:i] + word[i + 1] + word[i] + word[i + 2 :] for i in range(len(word) - 1) if word[i] != word[i + 1]]
    return typos


def test_every_typo_of_every_two_symbol_code_is_caught() -> None:
    """Every code of 2 random symbols (1,024) with its check: all 93 substitutions and both swaps fail."""
    for body in itertools.product(ALPHABET, repeat=2):
        word = "".join(body) + code_check.check_symbol("".join(body))
        assert code_check.is_well_formed(word)
        for typo in _errors(word):
            assert not code_check.is_well_formed(typo), (word, typo)


def test_every_typo_of_random_long_codes_is_caught() -> None:
    rng = random.Random(15)
    for _ in range(300):
        body = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(3, 20)))
        word = body + code_check.check_symbol(body)
        assert code_check.is_well_formed(word)
        for typo in _errors(word):
            assert not code_check.is_well_formed(typo), (word, typo)


def test_bulk_drawing_agrees_with_the_single_check() -> None:
    block = code_check.random_code_block(20_000, "VIP-", 9)
    codes = code_check.split_block(block, 4 + 9 + 1)
    assert len(codes) == 20_000
    for code in codes:
        assert code.startswith("VIP-")
        assert code[-1] == code_check.check_symbol(code[4:-1])
    # Every symbol turns up at every random position: the byte-to-symbol map is not skewed.
    for position in range(4, 13):
        assert {code[position] for code in codes} == set(ALPHABET)
    assert code_check.random_code_block(0, "X", 8) == b""
    assert code_check.random_bits(8) == 40


def test_mistyped_needs_the_shape_of_a_batch() -> None:
    shape = CodeShape("VIP-", 6)
    good = "VIP-" + "K7Q2MX" + code_check.check_symbol("K7Q2MX")
    wrong_check = good[:-1] + next(s for s in ALPHABET if s != good[-1])
    swapped = "VIP-" + "7KQ2MX" + good[-1]
    assert shape.has_shape(good) and not shape.is_mistyped(good)
    assert shape.is_mistyped(wrong_check) and shape.is_mistyped(swapped)
    assert missing_code_reason(wrong_check, [CodeShape("X", 6), shape]) == COUPON_MISTYPED
    # A well-formed code that was never stored was not typed wrong: unknown.
    assert missing_code_reason(good, [shape]) == UNKNOWN_COUPON
    for other in (
        "VIP-K7Q2MX",                  # one symbol short
        "VIP-K7Q2MXAB",                # one too many
        "VIB-" + wrong_check[4:],      # another prefix
        "VIP-K7Q2MI" + good[-1],       # I is not in the alphabet
        "SUMMER10",                    # a campaign's hand-made code
    ):
        assert missing_code_reason(other, [shape]) == UNKNOWN_COUPON, other
    assert missing_code_reason(wrong_check, []) == UNKNOWN_COUPON


def test_a_sorted_batch_is_distinct_ascending_and_whole() -> None:
    # 4 random symbols: 1,048,576 codes, so 20,000 draws repeat some (about 190): they are drawn again.
    blocks = list(code_check.sorted_codes(20_000, "VIP-", 4, piece=3_000))
    codes = [code for block in blocks for code in code_check.split_block(block, 4 + 4 + 1)]
    assert len(codes) == 20_000
    assert codes == sorted(set(codes))
    assert max(len(block) for block in blocks) <= 3_000 * 9
    for code in codes:
        assert code.startswith("VIP-") and code[-1] == code_check.check_symbol(code[4:-1])
    # Every symbol at every random position, the first (drawn as the group) included.
    for position in range(4, 8):
        assert {code[position] for code in codes} == set(ALPHABET)


def test_the_groups_of_a_sorted_batch_are_as_large_as_chance_makes_them() -> None:
    """How many codes start with each symbol is drawn, not fixed: about 1/32 each, varying."""
    codes = [c for block in code_check.sorted_codes(64_000, "", 8) for c in code_check.split_block(block, 9)]
    sizes = [sum(1 for c in codes if c[0] == symbol) for symbol in ALPHABET]
    assert sum(sizes) == 64_000
    assert all(1_700 < size < 2_300 for size in sizes)
    assert len(set(sizes)) > 1


def test_a_sorted_batch_too_large_for_its_code_space_comes_short() -> None:
    """One random symbol: 32 codes at most; the caller (the store) draws the rest again."""
    codes = [c for block in code_check.sorted_codes(200, "X", 1) for c in code_check.split_block(block, 3)]
    assert len(codes) == len(set(codes)) <= 32
    assert codes == sorted(codes)
