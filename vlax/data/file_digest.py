"""Content digests of data files, remembered per file state so that unchanged files are hashed once.

A source's ``fingerprint()`` keys the statistics cache and is recorded as the artifact's ``dataset_hash``. Names
and sizes alone miss a same-size overwrite (which may even keep the mtime), so the fingerprint covers the bytes.
Hashing runs at ~1 GB/s (sha256 with hardware support; measured 96 ms for a 100 MB file, page cache warm), which
matters for terabyte datasets; so each digest is remembered under ``<cache_root>/file_digests``, keyed by the
file's path, size, mtime, ctime, inode and device. Any write (and any ``utime`` that restores an mtime) moves the
kernel-kept ctime, so a changed file is always re-hashed, while a dataset copied elsewhere hashes to the same
digests (the digest is of content only, so recorded artifacts stay compatible).

Damage that happens without a write (bit rot) leaves the memo valid; TFRecord readers still catch it through their
per-record CRCs when reading.
"""

from __future__ import annotations

import hashlib
import os

from vlax.data.normalization import cache_root

_CHUNK = 1 << 22


def _memo_path(path: str, stat: os.stat_result, memo_dir: str) -> str:
    key = f"{os.path.realpath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\0" \
          f"{stat.st_dev}"
    return os.path.join(memo_dir, hashlib.sha256(key.encode()).hexdigest()[:32])


def hash_file(path: str) -> str:
    """sha256 hex digest of the bytes of ``path`` (read in 4 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_digest(path: str, memo_dir: str | None = None) -> str:
    """Content digest (sha256 hex) of ``path``, read from the memo when the file has not changed since.

    ``memo_dir`` defaults to ``<cache_root()>/file_digests``; a memo that cannot be written (read-only home) only
    costs re-hashing next time.
    """
    memo_dir = memo_dir or os.path.join(cache_root(), "file_digests")
    stat = os.stat(path)
    memo = _memo_path(path, stat, memo_dir)
    try:
        with open(memo) as f:
            digest = f.read().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = hash_file(path)
    if os.stat(path).st_ctime_ns != stat.st_ctime_ns:  # written while being hashed: do not remember either state
        return digest
    try:
        os.makedirs(memo_dir, exist_ok=True)
        tmp = f"{memo}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(digest)
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest
