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
from collections.abc import Callable


class HpackError(ValueError):
    """A header block that cannot be decoded: a COMPRESSION_ERROR for the connection."""


class HeaderListTooLarge(HpackError):
    """The decoded list outgrows SETTINGS_MAX_HEADER_LIST_SIZE: decoding stops there, so
    a block of references to one large entry (an HPACK bomb) costs at most the limit."""


MAX_CACHED_BLOCK = 512  # a client's steady-state block is a few indexes: cache those only
MAX_CACHED_STRING = 128


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


def _machine(codes: dict[tuple[int, int], int]) -> tuple[list, frozenset[int]]:
    """A decoder that reads four bits a step: (state | nibble) -> (next state, the byte
    it completes or b""), None where the bits reach EOS; and the states a string may
    end in (padding: at most 7 one-bits). States are the tree's inner nodes, times 16.
    Bit by bit it was 2.5 µs a byte: one 64 KB header block held the loop 150 ms."""
    inner: dict[tuple[int, int], int] = {}  # (depth, prefix) of an inner node -> number
    for length, code in codes:
        for depth in range(length):
            inner.setdefault((depth, code >> (length - depth)), len(inner))
    table: list[tuple[int, bytes] | None] = []
    for depth, prefix in inner:
        for nibble in range(16):
            d, p, out = depth, prefix, b""
            for shift in (3, 2, 1, 0):
                d, p = d + 1, p << 1 | (nibble >> shift & 1)
                symbol = codes.get((d, p))
                if symbol == EOS:
                    break
                if symbol is not None:
                    out, d, p = bytes((symbol,)), 0, 0  # codes are >= 5 bits: one a step
            else:
                table.append((inner[d, p] << 4, out))
                continue
            table.append(None)
    return table, frozenset(inner[d, (1 << d) - 1] << 4 for d in range(8))


_STEPS, _ENDS = _machine(_codes())


def huffman_decode(data: bytes) -> bytes:
    out = bytearray()
    state = 0
    steps = _STEPS
    for byte in data:
        step = steps[state | byte >> 4]
        if step is None:
            raise HpackError("Huffman string contains EOS")
        state, done = step
        if done:
            out += done
        step = steps[state | byte & 15]
        if step is None:
            raise HpackError("Huffman string contains EOS")
        state, done = step
        if done:
            out += done
    if state not in _ENDS:  # padding: at most 7 bits, all ones
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

    def __init__(
        self,
        max_list_size: int = 65536,
        check: Callable[[list[tuple[str, str]]], str | None] = lambda fields: None,
        max_table_size: int = 4096,
    ) -> None:
        self.max_list_size = max_list_size  # SETTINGS_MAX_HEADER_LIST_SIZE, as RFC 9113 counts
        self.check = check  # what the connection finds wrong in a list: cached with it
        self.limit = max_table_size  # what we advertised (SETTINGS_HEADER_TABLE_SIZE)
        self.capacity = max_table_size  # the peer may lower it by size updates
        self.table: deque[tuple[str, str]] = deque()  # newest first
        self.size = 0
        self._blocks: dict[bytes, tuple[list[tuple[str, str]], str | None]] = {}
        self._strings: dict[bytes, str] = {}

    def decode(self, block: bytes) -> tuple[list[tuple[str, str]], str | None]:
        """The (name, value) fields of a complete header block, in order, and what
        `check` said of them."""
        cached = self._blocks.get(block)
        if cached is not None:
            return cached
        fields: list[tuple[str, str]] = []
        changed = False
        listed, limit = 0, self.max_list_size
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = self._integer(block, pos, 7)
                field = self._entry(index)
            elif first & 0x40:  # literal, added to the table
                name, value, pos = self._literal(block, pos, 6)
                field = (name, value)
                self._add(name, value)
                changed = True
            elif first & 0x20:  # dynamic table size update
                if fields:  # RFC 7541 4.2: only at the beginning of a block
                    raise HpackError("table size update after a header field")
                size, pos = self._integer(block, pos, 5)
                if size > self.limit:
                    raise HpackError(f"table size update to {size} exceeds {self.limit}")
                self.capacity = size
                self._evict(0)
                changed = True
                continue
            else:  # literal not indexed (0000) or never indexed (0001)
                name, value, pos = self._literal(block, pos, 4)
                field = (name, value)
            listed += len(field[0]) + len(field[1]) + 32
            if listed > limit:
                raise HeaderListTooLarge(
                    f"header list larger than SETTINGS_MAX_HEADER_LIST_SIZE ({limit} bytes)"
                )
            fields.append(field)
        result = fields, self.check(fields)
        if changed or len(self._blocks) >= 64:
            self._blocks.clear()
        if not changed and end <= MAX_CACHED_BLOCK:
            self._blocks[block] = result
        return result

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
        if length > MAX_CACHED_STRING:
            return huffman_decode(raw).decode("latin-1"), stop
        text = self._strings.get(raw)
        if text is None:
            text = huffman_decode(raw).decode("latin-1")
            if len(self._strings) >= 1024:
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
