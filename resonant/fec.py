"""Forward error correction for V-Streams: a systematic Reed-Solomon block code over chunks
(zfec's, GF(2^8)). A block is k consecutive chunks; m parity chunks are made from it, and any
k of its k + m pieces give back the missing data chunks. See schema/handshake.yaml (streams, fec).

Pieces 0..k-1 are the block's data chunks, each zero-padded to chunk_bytes for coding (their
true lengths come from HEAD); pieces k..k+m-1 are the parity chunks. A short last block (fewer
than k chunks) is coded as if the chunks it lacks were chunk_bytes zero bytes ("virtual"
pieces, which a receiver always has). zfec is an optional dependency: `pip install 'resonant[fec]'`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

from resonant.handshake import MAX_FEC_K, MAX_FEC_M, MAX_FEC_PIECES

__all__ = ["SCHEME", "BlockCode", "FecUnavailable", "available", "problem", "check", "blocks", "parity_seq",
           "parity_of_seq", "last_parity_seq", "INSTALL_HINT"]

SCHEME = "rs"
INSTALL_HINT = "forward error correction needs zfec: pip install 'resonant[fec]' (or pip install 'zfec>=1.5')"


class FecUnavailable(ImportError):
    """zfec is not installed."""


_zfec = None


def _load():
    """The zfec module, imported on first use."""
    global _zfec
    if _zfec is None:
        try:
            import zfec
        except ImportError:
            raise FecUnavailable(INSTALL_HINT) from None
        _zfec = zfec
    return _zfec


def available() -> bool:
    """Whether the Reed-Solomon coder (zfec) can be imported."""
    try:
        _load()
    except FecUnavailable:
        return False
    return True


def problem(k, m) -> str | None:
    """What is wrong with (k, m) as a block code's parameters, or None."""
    if type(k) is not int or type(m) is not int:
        return f"k and m must be integers (got {k!r}, {m!r})"
    if not 1 <= k <= MAX_FEC_K:
        return f"k {k} is not in 1..{MAX_FEC_K} (max_fec_k)"
    if not 1 <= m <= MAX_FEC_M:
        return f"m {m} is not in 1..{MAX_FEC_M} (max_fec_m)"
    if k + m > MAX_FEC_PIECES:
        return f"k + m = {k + m} is more than max_fec_pieces ({MAX_FEC_PIECES})"
    return None


def check(k, m) -> None:
    """ValueError unless (k, m) are valid parameters."""
    p = problem(k, m)
    if p is not None:
        raise ValueError(p)


# ------------------------------------------------------------------ numbering (HEAD's chunks, k, m)

def blocks(chunks: int, k: int) -> int:
    """The number of blocks of a stream of `chunks` chunks."""
    return -(-chunks // k)


def parity_seq(chunks: int, k: int, m: int, b: int, j: int) -> int:
    """frame_seq of parity chunk j of block b: chunks + 2 + b*m + j (TAIL is chunks + 1)."""
    return chunks + 2 + b * m + j


def parity_of_seq(chunks: int, k: int, m: int, seq: int) -> tuple[int, int] | None:
    """(block, j) of the parity frame with frame_seq seq, or None if seq names none."""
    i = seq - chunks - 2
    if i < 0 or i >= blocks(chunks, k) * m:
        return None
    return divmod(i, m)


def last_parity_seq(chunks: int, k: int, m: int) -> int:
    """The highest parity frame_seq (TAIL's, chunks + 1, when there are no chunks); HEARTs go above it."""
    return chunks + 1 + blocks(chunks, k) * m


# ------------------------------------------------------------------ the code

@lru_cache(maxsize=32)
def _coders(k: int, m: int):
    zfec = _load()
    return zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)


class BlockCode:
    """The (k + m, k) code over chunks of chunk_bytes bytes."""

    def __init__(self, k: int, m: int, chunk_bytes: int) -> None:
        check(k, m)
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes {chunk_bytes} must be at least 1")
        self.k, self.m, self.chunk_bytes = k, m, chunk_bytes
        self._enc, self._dec = _coders(k, m)
        self._zero = bytes(chunk_bytes)

    def _piece(self, buf) -> object:
        """A data chunk as a coding piece: itself (a view, no copy) when chunk_bytes long, else zero-padded."""
        n = buf.nbytes if isinstance(buf, memoryview) else len(memoryview(buf).cast("B"))
        if n == self.chunk_bytes:
            return buf
        if n > self.chunk_bytes:
            raise ValueError(f"a {n}-byte chunk is longer than chunk_bytes ({self.chunk_bytes})")
        return memoryview(buf).tobytes() + bytes(self.chunk_bytes - n) if n else self._zero

    def encode(self, data: Sequence, which: Sequence[int] | None = None) -> list[bytes]:
        """The parity chunks (all m, or those numbered in `which`, 0..m-1) of a block whose data
        chunks are `data` (1..k bytes-like views, each at most chunk_bytes; fewer than k: the
        rest are zero chunks)."""
        if not 1 <= len(data) <= self.k:
            raise ValueError(f"a block has 1..{self.k} data chunks, not {len(data)}")
        pieces = tuple(self._piece(d) for d in data) + (self._zero,) * (self.k - len(data))
        want = tuple(range(self.k, self.k + self.m)) if which is None else tuple(self.k + j for j in which)
        if any(not self.k <= w < self.k + self.m for w in want):
            raise ValueError(f"parity numbers must be in 0..{self.m - 1}")
        return [bytes(p) for p in self._enc.encode(pieces, want)]

    def recover(self, pieces: Mapping[int, object], n_data: int) -> dict[int, bytes]:
        """The missing data chunks (index -> chunk_bytes bytes; the caller cuts each to its true
        length) of a block of n_data data chunks, from `pieces`: index (0..k+m-1) -> bytes-like,
        data pieces at most chunk_bytes (padded here), parity exactly chunk_bytes. Data indices
        n_data..k-1 are the virtual zero chunks and need not be given. ValueError when fewer
        than k pieces are known."""
        k, m = self.k, self.m
        if not 1 <= n_data <= k:
            raise ValueError(f"a block has 1..{k} data chunks, not {n_data}")
        slots: list = [None] * k
        nums = list(range(k))
        for i in range(n_data, k):
            slots[i] = self._zero
        for i, buf in pieces.items():
            if 0 <= i < n_data:
                slots[i] = self._piece(buf)
            elif not k <= i < k + m and not n_data <= i < k:
                raise ValueError(f"piece {i} is not a piece of a ({k} + {m}) block")
        missing = [i for i in range(n_data) if slots[i] is None]
        if not missing:
            return {}
        parity = sorted(i for i in pieces if i >= k)
        if len(parity) < len(missing):
            raise ValueError(f"{len(missing)} data chunks missing and {len(parity)} parity chunks: "
                             f"a block needs {k} of its {k + m} pieces")
        for i, p in zip(missing, parity):
            buf = pieces[p]
            if len(memoryview(buf)) != self.chunk_bytes:
                raise ValueError(f"parity piece {p} is {len(memoryview(buf))} bytes, not chunk_bytes ({self.chunk_bytes})")
            slots[i] = buf
            nums[i] = p
        out = self._dec.decode(tuple(slots), tuple(nums))
        return {i: bytes(out[i]) for i in missing}
