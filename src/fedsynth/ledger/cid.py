"""IPFS-compatible content IDs, computed as ``ipfs add`` builds its DAG.

``ipfs add`` (default settings) cuts a file into 256 KiB chunks, wraps each chunk in a
dag-pb node holding a UnixFS ``File`` message, and links them into a balanced tree of at
most 174 links per node; a file of one chunk is that single leaf node. The content ID is
the sha2-256 multihash of the root node's bytes. We render it as a CIDv1 (base32, dag-pb),
the same DAG as ``ipfs add`` gives and ``ipfs cid format -v 1`` prints; links inside the
DAG are CIDv0 (plain multihashes) as in ``ipfs add``'s default output. Checked against an
independent implementation (Debian's ``ipfs_cid``) in the tests.

Protobuf field numbers (code name → spec):
  PBNode   Links = 2 (repeated PBLink, written first), Data = 1
  PBLink   Hash = 1, Name = 2 (written even when empty), Tsize = 3
  UnixFS   Type = 1 (File = 2), Data = 2, filesize = 3, blocksizes = 4 (repeated, unpacked)
"""

from __future__ import annotations

from dataclasses import dataclass

from multiformats import CID, multihash

CHUNK_SIZE = 256 * 1024
MAX_LINKS = 174
UNIXFS_FILE = 2


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _unixfs_file(data: bytes | None, filesize: int, blocksizes: list[int]) -> bytes:
    out = _field_int(1, UNIXFS_FILE)
    if data:  # go-unixfs writes no Data field for an empty file
        out += _field_bytes(2, data)
    out += _field_int(3, filesize)
    return out + b"".join(_field_int(4, size) for size in blocksizes)


@dataclass(frozen=True)
class _Node:
    """One DAG node: its multihash, its encoded size plus its descendants' (Tsize), file bytes."""

    digest: bytes
    tsize: int
    filesize: int


def _leaf(chunk: bytes) -> _Node:
    block = _field_bytes(1, _unixfs_file(chunk, len(chunk), []))
    return _Node(multihash.digest(block, "sha2-256"), len(block), len(chunk))


def _parent(children: list[_Node]) -> _Node:
    links = b"".join(
        _field_bytes(2, _field_bytes(1, c.digest) + _field_bytes(2, b"") + _field_int(3, c.tsize))
        for c in children
    )
    filesize = sum(c.filesize for c in children)
    block = links + _field_bytes(1, _unixfs_file(None, filesize, [c.filesize for c in children]))
    return _Node(multihash.digest(block, "sha2-256"), len(block) + sum(c.tsize for c in children), filesize)


def content_id(data: bytes) -> str:
    """The CIDv1 (base32, dag-pb) that ``ipfs add`` gives ``data``."""
    level = [_leaf(data[i : i + CHUNK_SIZE]) for i in range(0, max(len(data), 1), CHUNK_SIZE)]
    while len(level) > 1:
        level = [_parent(level[i : i + MAX_LINKS]) for i in range(0, len(level), MAX_LINKS)]
    return str(CID("base32", 1, "dag-pb", level[0].digest))


def is_content_id(text: str) -> bool:
    try:
        CID.decode(text)
    except Exception:  # multiformats raises several error types for malformed input
        return False
    return True
