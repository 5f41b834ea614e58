"""``vmagent onboard``'s hosts file work, pure: istioctl's ``hosts`` lines parsed, the marked
block of ``/etc/hosts`` set or removed (every other byte kept), names another line already
gives a different address. Bytes and text in, values out; no I/O."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence

from vmagent.config_names import is_hostname


class HostsError(ValueError):
    """A hosts file or line that cannot be used; the message names the file and line."""


BEGIN = b"# BEGIN vmagent onboard (istioctl hosts; remove with: vmagent onboard --remove-hosts)"
BEGIN_PREFIX = b"# BEGIN vmagent onboard"
END = b"# END vmagent onboard"


@dataclasses.dataclass(frozen=True)
class HostEntry:
    """One ``IP name [name...]`` line of istioctl's ``hosts`` file."""

    ip: str
    names: tuple[str, ...]

    def line(self) -> bytes:
        return " ".join((self.ip, *self.names)).encode("ascii")


HOSTS_FIX = "expected 'IP NAME [NAME...]' as istioctl writes it; fix or delete the line"


def hosts_lines(text: str, where: str) -> tuple[tuple[HostEntry, ...], list[str]]:
    """(entries, one error per bad line) of istioctl's ``hosts``: ``IP name [name...]`` lines,
    ``#`` starts a comment."""
    entries: list[HostEntry] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.partition("#")[0].split()
        if not words:
            continue
        ip, names = words[0], tuple(words[1:])
        problem = ""
        try:
            ipaddress.ip_address(ip.partition("%")[0])  # a zone (fe80::1%eth0) is allowed
        except ValueError:
            problem = f"{ip!r} is not an IP address"
        if not problem and not names:
            problem = f"no name after {ip}"
        bad = [name for name in names if not name.isascii() or not is_hostname(name)]
        if not problem and bad:
            problem = f"{bad[0]!r} is not a host name"
        if problem:
            errors.append(f"{where}:{number}: {problem} ({HOSTS_FIX})")
        else:
            entries.append(HostEntry(ip, names))
    return tuple(entries), errors


def parse_hosts(text: str, where: str) -> tuple[HostEntry, ...]:
    """The entries of :func:`hosts_lines`; HostsError listing every bad line."""
    entries, errors = hosts_lines(text, where)
    if errors:
        raise HostsError("\n".join(errors))
    return entries


def _lines(text: bytes) -> list[bytes]:
    return text.splitlines(keepends=True)


def _bare(line: bytes) -> bytes:
    return line.rstrip(b"\r\n").rstrip()


def _blocks(lines: Sequence[bytes], where: str) -> list[tuple[int, int]]:
    """(first, last) line index of each marked block; HostsError on a broken marker."""
    found: list[tuple[int, int]] = []
    start: int | None = None
    for index, line in enumerate(lines):
        bare = _bare(line)
        if bare.startswith(BEGIN_PREFIX):
            if start is not None:
                raise HostsError(
                    f"{where}:{index + 1}: second BEGIN before END; fix the file by hand (one "
                    "BEGIN ... END pair)"
                )
            start = index
        elif bare == END:
            if start is None:
                raise HostsError(
                    f"{where}:{index + 1}: END without BEGIN; fix the file by hand (delete the "
                    "line, or add its BEGIN)"
                )
            found.append((start, index))
            start = None
    if start is not None:
        raise HostsError(
            f"{where}:{start + 1}: '# BEGIN vmagent onboard' without '# END vmagent onboard'; "
            "fix the file by hand (vmagent does not guess where the block ends)"
        )
    return found


def set_block(text: bytes, entries: Sequence[HostEntry], where: str) -> bytes:
    """``text`` (a hosts file) with one marked block holding ``entries``: an existing block
    is replaced where it stands, else the block is appended. Every other byte is kept (a
    missing final newline is added before an appended block)."""
    lines = _lines(text)
    blocks = _blocks(lines, where)
    block = [BEGIN + b"\n", *(e.line() + b"\n" for e in entries), END + b"\n"]
    if not blocks:
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += b"\n"
        return b"".join(lines + block)
    kept = _without(lines, blocks[1:])
    first, last = blocks[0]
    return b"".join(kept[:first] + block + kept[last + 1 :])


def remove_block(text: bytes, where: str) -> bytes:
    """``text`` without the marked blocks (no change when there is none)."""
    lines = _lines(text)
    return b"".join(_without(lines, _blocks(lines, where)))


def _without(lines: list[bytes], blocks: Sequence[tuple[int, int]]) -> list[bytes]:
    drop = {i for first, last in blocks for i in range(first, last + 1)}
    return [line for index, line in enumerate(lines) if index not in drop]


def conflicts(text: bytes, entries: Sequence[HostEntry], where: str) -> list[str]:
    """Warnings for names of ``entries`` that lines outside the block also name with another
    address: glibc's files backend answers with the first matching line, so those win."""
    lines = _lines(text)
    inside = {i for first, last in _blocks(lines, where) for i in range(first, last + 1)}
    wanted = {name.lower().rstrip("."): entry.ip for entry in entries for name in entry.names}
    warnings: list[str] = []
    for index, line in enumerate(lines):
        words = line.partition(b"#")[0].split()
        if index in inside or len(words) < 2:
            continue
        ip = words[0].decode("ascii", "replace")
        for word in words[1:]:
            name = word.decode("ascii", "replace").lower().rstrip(".")
            if name in wanted and wanted[name] != ip:
                warnings.append(
                    f"{where}:{index + 1}: {name} is already listed with {ip} (left as it is); "
                    f"that line wins over the onboard block's {wanted[name]}: remove it if stale"
                )
    return warnings
