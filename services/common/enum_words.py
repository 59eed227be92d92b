"""Proto enums as words: the lowercase name after the enum's prefix.

``CONVERSION_STATUS_PENDING`` is ``pending`` in PostgreSQL, in the gateway's
JSON and in metric labels (ARCHITECTURE.md section 5); every layer converts
through this one class. ``*_UNSPECIFIED`` (0) has no word: it means "not set".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar, cast

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

W = TypeVar("W", bound=str)
V = TypeVar("V", bound=int)


class EnumWords(Generic[V]):
    """A proto enum's numbers and words (UNSPECIFIED left out)."""

    def __init__(self, enum: _EnumTypeWrapper[V], prefix: str) -> None:
        self._numbers: dict[str, V] = {
            name.removeprefix(prefix).lower(): number for name, number in enum.items() if number != 0
        }
        self.words: dict[int, str] = {int(number): word for word, number in self._numbers.items()}

    def number(self, word: str) -> V:
        """The number of a known word (KeyError otherwise: words come from our own store)."""
        return self._numbers[word]

    def number_or_unspecified(self, word: str | None) -> V:
        return self._numbers.get(word or "", cast(V, 0))

    def word(self, number: int, default: W) -> W:
        """The word of ``number``, or ``default`` for UNSPECIFIED or a number this build does not know."""
        return cast(W, self.words.get(number, default))

    def shown(self, number: int) -> str:
        """For people and JSON: a value newer than this build's stubs is its number, never a crash."""
        return self.words.get(number) or ("unspecified" if number == 0 else str(number))
