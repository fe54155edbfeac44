"""Canonical Huffman coding of small-alphabet symbol streams (Deep Compression's stage 3).

A code is described by its code lengths alone (one byte per symbol of the alphabet, 0 for an
absent symbol); codes are assigned canonically (shorter codes first, then by symbol value, as
DEFLATE does), so the file stores only the lengths.  Lengths are limited to MAX_LENGTH bits so
that the decoder's lookup table has a fixed, small size: when a plain Huffman tree is deeper, the
frequencies are halved (kept >= 1) and the tree is rebuilt, which ends at a balanced tree.
Bits are written most significant first.
"""

import heapq

import numpy as np

from espresso.errors import ModelFileError

MAX_LENGTH = 16
_CHUNK = 1 << 20  # symbols per vectorized encoding pass (bounds the temporaries)
CHUNK_BITS = 1 << 20  # bits per decoding window


def code_lengths(frequencies, max_length=MAX_LENGTH):
    """Code length per symbol (0 where the frequency is 0) of a Huffman code, at most max_length."""
    freq = np.asarray(frequencies, np.int64).copy()
    present = np.flatnonzero(freq)
    if len(present) > 1 << max_length:
        raise ValueError(f"{len(present)} symbols do not fit codes of at most {max_length} bits")
    while True:
        lengths = _huffman_lengths(freq)
        if lengths.max(initial=0) <= max_length:
            return lengths
        freq[present] = np.maximum(freq[present] >> 1, 1)


def _huffman_lengths(freq):
    lengths = np.zeros(len(freq), np.int64)
    heap = [(int(f), (s,)) for s, f in enumerate(freq) if f > 0]
    if len(heap) == 1:
        lengths[heap[0][1][0]] = 1
        return lengths
    heapq.heapify(heap)
    while len(heap) > 1:  # each merge pushes the merged symbols one level deeper
        fa, a = heapq.heappop(heap)
        fb, b = heapq.heappop(heap)
        lengths[list(a + b)] += 1
        heapq.heappush(heap, (fa + fb, a + b))
    return lengths


def canonical_codes(lengths):
    """The canonical code of each symbol (its `lengths[s]` low bits), given valid lengths."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(len(lengths), np.int64)
    code, previous = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - previous
        codes[s], previous = code, int(lengths[s])
        code += 1
    return codes


def check_lengths(lengths, what="Huffman table"):
    """Refuse lengths that no prefix code has (Kraft sum over 1) or that pass MAX_LENGTH."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.max(initial=0) > MAX_LENGTH:
        raise ModelFileError(f"{what}: code length {lengths.max()} exceeds {MAX_LENGTH}")
    used = lengths[lengths > 0]
    if used.size and int(np.sum(1 << (MAX_LENGTH - used))) > 1 << MAX_LENGTH:
        raise ModelFileError(f"{what}: the code lengths do not form a prefix code")


def encode(symbols, lengths):
    """(bytes, number of bits) of `symbols` coded with the canonical code of `lengths`."""
    symbols = np.asarray(symbols, np.int64)
    lengths = np.asarray(lengths, np.int64)
    if symbols.size and lengths[symbols].min() == 0:
        raise ValueError("a symbol to encode has no code")
    codes = canonical_codes(lengths)
    bits = [_bits(codes[part], lengths[part]) for part in np.array_split(symbols, max(1, -(-symbols.size // _CHUNK)))]
    bits = np.concatenate(bits) if bits else np.zeros(0, np.uint8)
    return np.packbits(bits).tobytes(), int(bits.size)


def _bits(codes, lengths):
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    j = np.arange(total) - np.repeat(starts, lengths)  # bit index within its code
    shift = np.repeat(lengths, lengths) - 1 - j
    return ((np.repeat(codes, lengths) >> shift) & 1).astype(np.uint8)


def decode(data, nbits, lengths, count, what="stream"):
    """`count` symbols from the first `nbits` bits of `data`; ModelFileError when they do not
    decode to exactly that many symbols (a corrupt or crafted stream).  Memory: four bytes per
    bit of the stream and per symbol, and a lookup window over at most CHUNK_BITS bits."""
    lengths = np.asarray(lengths, np.int64)
    check_lengths(lengths, what)
    if nbits > 8 * len(data):
        raise ModelFileError(f"{what}: {nbits} bits declared, {8 * len(data)} present")
    if count > nbits:  # every code is at least one bit long
        raise ModelFileError(f"{what}: {count} symbols cannot fit in {nbits} bits")
    out = np.zeros(count, np.int32)
    if count == 0:
        return out
    width = int(lengths.max())
    table_symbol, table_length = _table(lengths, width)
    bits = np.zeros(nbits + width, np.int32)
    bits[:nbits] = np.unpackbits(np.frombuffer(data, np.uint8), count=nbits)
    pos = done = 0
    while done < count:
        if pos >= nbits:
            raise ModelFileError(f"{what}: ends after {done} of {count} symbols")
        hi = min(nbits, pos + CHUNK_BITS)
        window = np.zeros(hi - pos, np.int32)  # the next `width` bits at each bit position
        for j in range(width):
            window = (window << 1) | bits[pos + j:hi + j]
        symbols, steps = _walk(table_symbol[window].tolist(), table_length[window].tolist(), count - done, what,
                               pos)
        out[done:done + len(symbols)] = symbols
        done, pos = done + len(symbols), pos + steps
    if pos != nbits:
        raise ModelFileError(f"{what}: {count} symbols use {pos} bits, {nbits} declared")
    return out


def _walk(symbol_at, length_at, wanted, what, base):
    """Decode from the start of a window until it is used up or `wanted` symbols are out;
    returns (symbols, bits consumed)."""
    out, p, end = [], 0, len(symbol_at)
    while p < end and len(out) < wanted:
        s = symbol_at[p]
        if s < 0:
            raise ModelFileError(f"{what}: invalid code at bit {base + p}")
        out.append(s)
        p += length_at[p]
    return out, p


def _table(lengths, width):
    codes = canonical_codes(lengths)
    symbol = np.full(1 << width, -1, np.int64)
    length = np.ones(1 << width, np.int64)
    for s in np.flatnonzero(lengths):
        lo = int(codes[s]) << (width - int(lengths[s]))
        hi = (int(codes[s]) + 1) << (width - int(lengths[s]))
        symbol[lo:hi], length[lo:hi] = s, lengths[s]
    return symbol, length


def pack_fixed(symbols, width):
    """Symbols as fixed-width big-endian bit fields (the stream without Huffman coding)."""
    symbols = np.asarray(symbols, np.int64)
    bits = ((symbols[:, None] >> np.arange(width - 1, -1, -1)) & 1).astype(np.uint8)
    return np.packbits(bits.ravel()).tobytes()


def unpack_fixed(data, width, count):
    if count * width > 8 * len(data):
        raise ModelFileError(f"fixed-width stream: {count} symbols of {width} bits need "
                             f"{count * width} bits, {8 * len(data)} present")
    bits = np.unpackbits(np.frombuffer(data, np.uint8))[: count * width].reshape(count, width)
    return (bits.astype(np.int64) << np.arange(width - 1, -1, -1)).sum(axis=1)
