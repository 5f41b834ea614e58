"""A compact, immutable map from DNS names (wire form) to short byte strings, for the proxy's
100k-service name tables (issue 7 §5).

A dict of 300k ``bytes`` keys costs ~45 MB in 300k small objects that are allocated among the
short-lived objects of a table load; once those are freed, the interpreter's small-object
arenas stay partly used and the process keeps the memory (RSS grew by ~60 MB per swap,
measured). Here the whole map is six flat buffers: every key back to back in one ``bytes``,
every distinct value back to back in another, their start offsets and each key's value number
in ``array``s, and an open-addressing hash table (linear probing, CRC-32, at most half full)
of key numbers. ~17 MB at 300k names; nothing for the garbage collector to track; freed in a
few calls. A lookup costs about a microsecond, paid only on the proxy's first answer for a
question (later ones come from its reply cache)."""

from __future__ import annotations

from array import array
from collections.abc import Collection, Iterator, Mapping
from itertools import accumulate
from zlib import crc32

from vmagent.dns.steps import STEP_ENTRIES, Steps


class NameIndex(Mapping[bytes, bytes]):
    """Built by :func:`build_index_steps`; read with ``get``/``[]``/iteration (insertion
    order)."""

    __slots__ = ("_key_starts", "_keys", "_mask", "_slots", "_value_of", "_value_starts", "_values")

    def __init__(
        self,
        keys: bytes = b"",
        key_starts: array[int] | None = None,
        slots: array[int] | None = None,
        values: bytes = b"",
        value_starts: array[int] | None = None,
        value_of: array[int] | None = None,
    ) -> None:
        self._keys = keys
        self._key_starts = key_starts if key_starts is not None else array("I", [0])
        self._slots = slots if slots is not None else array("i", [-1])
        self._mask = len(self._slots) - 1
        self._values = values
        self._value_starts = value_starts if value_starts is not None else array("I", [0])
        self._value_of = value_of if value_of is not None else array("I")

    def _number(self, name: bytes) -> int:
        """The key number of ``name``, or -1."""
        slots, mask, keys, starts = self._slots, self._mask, self._keys, self._key_starts
        length = len(name)
        slot = crc32(name) & mask
        while True:
            number = slots[slot]
            if number < 0:
                return -1
            start = starts[number]
            if starts[number + 1] - start == length and keys.startswith(name, start):
                return number
            slot = (slot + 1) & mask

    def _value(self, number: int) -> bytes:
        index = self._value_of[number]
        return self._values[self._value_starts[index] : self._value_starts[index + 1]]

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        number = self._number(name)
        return default if number < 0 else self._value(number)

    def __getitem__(self, name: bytes) -> bytes:
        number = self._number(name)
        if number < 0:
            raise KeyError(name)
        return self._value(number)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and self._number(name) >= 0

    def __iter__(self) -> Iterator[bytes]:
        keys, starts = self._keys, self._key_starts
        for number in range(len(starts) - 1):
            yield keys[starts[number] : starts[number + 1]]

    def __len__(self) -> int:
        return len(self._key_starts) - 1

    def to_bytes(self) -> bytes:
        """The index as one byte string (for :meth:`from_bytes` in another process of the same
        machine: native byte order)."""
        parts = [
            self._keys,
            self._key_starts.tobytes(),
            self._slots.tobytes(),
            self._values,
            self._value_starts.tobytes(),
            self._value_of.tobytes(),
        ]
        return array("Q", [len(p) for p in parts]).tobytes() + b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> NameIndex:
        """The index :meth:`to_bytes` gave; ValueError if ``data`` is not one."""
        view = memoryview(data)
        lengths = array("Q")
        lengths.frombytes(view[:48])
        if len(view) != 48 + sum(lengths):
            raise ValueError("not a NameIndex")
        parts: list[memoryview] = []
        offset = 48
        for length in lengths:
            parts.append(view[offset : offset + length])
            offset += length
        key_starts, slots, value_starts, value_of = (
            array("I"),
            array("i"),
            array("I"),
            array("I"),
        )
        key_starts.frombytes(parts[1])
        slots.frombytes(parts[2])
        value_starts.frombytes(parts[4])
        value_of.frombytes(parts[5])
        size = len(slots)
        if size & (size - 1) or len(value_of) != len(key_starts) - 1:
            raise ValueError("not a NameIndex")
        keys, values = bytes(parts[0]), bytes(parts[3])
        return cls(keys, key_starts, slots, values, value_starts, value_of)

    @property
    def distinct_values(self) -> int:
        return len(self._value_starts) - 1

    @property
    def nbytes(self) -> int:
        """Memory held by the buffers (for logs and tests)."""
        arrays = (self._key_starts, self._slots, self._value_starts, self._value_of)
        return len(self._keys) + len(self._values) + sum(a.itemsize * len(a) for a in arrays)


def build_index_steps(
    keys: Collection[bytes], value_of: array[int], values: list[bytes]
) -> Steps[NameIndex]:
    """The index mapping each of ``keys`` (at most 255 bytes each, no two equal) to
    ``values[value_of[i]]`` for the i-th key; yields every few thousand keys."""
    count = len(keys)
    if count >= 1 << 31 or len(value_of) != count:
        raise ValueError("keys and value numbers do not match")
    key_starts = array("I", accumulate(map(len, keys), initial=0))
    value_starts = array("I", accumulate(map(len, values), initial=0))
    joined = b"".join(keys)
    yield
    size = 8
    while size < 2 * count:
        size *= 2
    slots = array("i", [-1]) * size
    mask = size - 1
    for number, key in enumerate(keys):
        slot = crc32(key) & mask
        while slots[slot] >= 0:
            slot = (slot + 1) & mask
        slots[slot] = number
        if number % (STEP_ENTRIES * 10) == 0:
            yield
    return NameIndex(joined, key_starts, slots, b"".join(values), value_starts, value_of)
