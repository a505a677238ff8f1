"""HPACK (RFC 7541) header-block decoding, for our own HTTP/2 (coalesce.http2.endpoint).

Decoding only: what we send is built from static-table indexes and literals
without indexing (`literal`), so no encoder state is ever kept.

Clients repeat themselves: after its first calls a gRPC client's header block is a
handful of indexes into the dynamic table, byte for byte the same each call. Such a
block is decoded once and looked up afterwards, until the dynamic table changes.

The Huffman code is the canonical code of RFC 7541 Appendix B, rebuilt from each
symbol's code length (lengths read off libnghttp2's encoder; the codes they imply
match the RFC's published ones, and tests decode what libnghttp2 and gRPC encode).
"""

from __future__ import annotations

from collections import deque


class HpackError(ValueError):
    """A header block that cannot be decoded: a COMPRESSION_ERROR for the connection."""


STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
STATIC_SIZE = len(STATIC_TABLE)  # 61: dynamic entries are numbered from 62

# Code length of each byte value's Huffman code, 5 + (letter - "A"); EOS (256) has 30.
_LENGTHS = (
    "ISXXXXXXXTZXXZXXXXXXXXZXXXXXXXXXBFFHIBDGFFDGDBBBAAABBBBBBBCDKBHFIBCCCCCCCCCCCCCCCC"
    "CCCCCCDCDIOIJBKABABABBBACCBBBABCBAABCCCCCKGJIXPRPPRRRSRSSSSSTSTTRSTSSSSQRSRSSTRQPRR"
    "SSQSRRTQRSSQQRQSRSSPRRRSRRSVVPORSRUVVVWWVTUOQVWWVWTQQVVXWWWPTPQRQQSRRUUTTVSVWVVWWWW"
    "WXWWWWWV"
)
EOS = 256


def _codes() -> dict[tuple[int, int], int]:
    """(length, code) -> symbol: the canonical code, shorter codes first, then by symbol."""
    lengths = [ord(c) - ord("A") + 5 for c in _LENGTHS] + [30]
    order = sorted(range(257), key=lambda s: (lengths[s], s))
    table, code, previous = {}, -1, lengths[order[0]]
    for symbol in order:
        code = (code + 1) << (lengths[symbol] - previous)
        previous = lengths[symbol]
        table[(previous, code)] = symbol
    return table


_HUFFMAN = _codes()


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    code = length = 0
    table = _HUFFMAN
    for byte in data:
        for shift in range(7, -1, -1):
            code = code << 1 | (byte >> shift & 1)
            length += 1
            symbol = table.get((length, code))
            if symbol is not None:
                if symbol == EOS:
                    raise HpackError("Huffman string contains EOS")
                out.append(symbol)
                code = length = 0
            elif length > 30:
                raise HpackError("invalid Huffman code")
    if length > 7 or code != (1 << length) - 1:  # padding: at most 7 bits, all ones
        raise HpackError("invalid Huffman padding")
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A field as a literal without indexing, new name, no Huffman (RFC 7541 6.2.2):
    what we send needs no encoder state kept in step with the peer."""
    return b"\x00" + _length(name) + name + _length(value) + value


def _length(data: bytes) -> bytes:
    """A string length as a 7-bit-prefix integer, Huffman bit clear."""
    n = len(data)
    if n < 127:
        return bytes((n,))
    out, n = bytearray((127,)), n - 127
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Decoder:
    """One connection's HPACK decoding state (the peer's encoder's mirror)."""

    def __init__(self, max_table_size: int = 4096) -> None:
        self.limit = max_table_size  # what we advertised (SETTINGS_HEADER_TABLE_SIZE)
        self.capacity = max_table_size  # the peer may lower it by size updates
        self.table: deque[tuple[str, str]] = deque()  # newest first
        self.size = 0
        self._blocks: dict[bytes, list[tuple[str, str]]] = {}
        self._strings: dict[bytes, str] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The (name, value) fields of a complete header block, in order."""
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        fields: list[tuple[str, str]] = []
        changed = False
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = self._integer(block, pos, 7)
                fields.append(self._entry(index))
            elif first & 0x40:  # literal, added to the table
                name, value, pos = self._literal(block, pos, 6)
                fields.append((name, value))
                self._add(name, value)
                changed = True
            elif first & 0x20:  # dynamic table size update
                size, pos = self._integer(block, pos, 5)
                if size > self.limit:
                    raise HpackError(f"table size update to {size} exceeds {self.limit}")
                self.capacity = size
                self._evict(0)
                changed = True
            else:  # literal not indexed (0000) or never indexed (0001)
                name, value, pos = self._literal(block, pos, 4)
                fields.append((name, value))
        if changed or len(self._blocks) >= 256:
            self._blocks.clear()
        if not changed:
            self._blocks[block] = fields
        return fields

    def _entry(self, index: int) -> tuple[str, str]:
        if 0 < index <= STATIC_SIZE:
            return STATIC_TABLE[index - 1]
        if STATIC_SIZE < index <= STATIC_SIZE + len(self.table):
            return self.table[index - STATIC_SIZE - 1]
        raise HpackError(f"header index {index} is not in the table")

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[str, str, int]:
        index, pos = self._integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(block, pos)
        value, pos = self._string(block, pos)
        return name, value, pos

    def _string(self, block: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(block):
            raise HpackError("header block ends inside a string")
        huffman = block[pos] & 0x80
        length, pos = self._integer(block, pos, 7)
        stop = pos + length
        if stop > len(block):
            raise HpackError("string overruns the header block")
        raw = block[pos:stop]
        if not huffman:
            return raw.decode("latin-1"), stop
        text = self._strings.get(raw)
        if text is None:
            text = huffman_decode(raw).decode("latin-1")
            if len(self._strings) > 4096:
                self._strings.clear()
            self._strings[raw] = text
        return text, stop

    @staticmethod
    def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
        mask = (1 << prefix) - 1
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            if pos >= len(block):
                raise HpackError("header block ends inside an integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos
            if shift > 28:
                raise HpackError("integer too large")

    def _add(self, name: str, value: str) -> None:
        entry = len(name) + len(value) + 32
        self._evict(entry)
        if entry <= self.capacity:  # an entry larger than the table just empties it
            self.table.appendleft((name, value))
            self.size += entry

    def _evict(self, room: int) -> None:
        while self.table and self.size + room > self.capacity:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + 32
