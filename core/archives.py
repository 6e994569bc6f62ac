"""Untrusted ``.zip`` and ``.tar`` archives, listed and extracted without trusting a byte.

A tenant uploads a dataset as an archive; the API lists it (:func:`inspect_archive`) to refuse
a bad one before queueing anything, and the worker extracts it (:func:`extract_archive`) into
a fresh folder. Both apply the same rules and raise :class:`ArchiveError` naming the problem
and the member:

- Member names are relative ``/``-separated paths: an absolute name, a ``..`` component, a
  backslash or a NUL byte is refused (``.`` and empty components are dropped, so
  ``./train/a.png`` is ``train/a.png``). Two files of one name, or a name that is both a file
  and a folder, are refused.
- Only regular files and folders: a symbolic or hard link, a device, a FIFO or a socket (in a
  tar, or a zip member whose Unix mode says so), a sparse tar member or an encrypted zip
  member is refused.
- At most ``max_members`` members (files and folders), and at most ``max_total_bytes`` of
  declared inflated size in all.
- A zip member inflating to more than ``max_ratio`` times its compressed size is refused (a
  zip bomb), as is a compressed tar whose stream inflates past ``max_ratio`` times the file;
  either only past ``ratio_exempt_bytes`` (a small file of repeated bytes compresses well
  legitimately, and cannot fill a disk).
- While extracting, the bytes actually inflated are counted: a member that inflates past the
  size its header declares (a lying header) or short of it, or a total past
  ``max_total_bytes``, stops the extraction at once.

Listing reads only a zip's central directory, or a tar's headers (seeking over the data of a
plain tar; a compressed tar must be inflated to reach its headers, so its stream is counted
against the limits as it goes). Extraction writes only into ``dest``, which it creates; on any
error everything under ``dest`` is removed. Nothing of an archive's metadata (modes, owners,
times) is applied: files are written with the process's default permissions.

Standard library only, like ``core.config``: the API, which never loads numpy or torch, lists
uploads with it (it is torch-free), and ``core.datasets.tenant`` extracts with it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ArchiveError",
    "ArchiveLimits",
    "ArchiveListing",
    "ArchiveMember",
    "extract_archive",
    "inspect_archive",
]

_CHUNK = 1 << 20  # bytes copied per read while extracting
_MAX_DIRECTORY_ENTRY = 4096  # bytes a zip's central directory may hold per member, on average
_TAR_OVERHEAD = 8192  # stream bytes per tar member beyond its data: headers, long names, padding


class ArchiveError(ValueError):
    """An archive refused by the rules above; the message names the problem and the member."""


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may hold. Sizes are in bytes."""

    max_members: int = 20_000  # files and folders together
    max_total_bytes: int = 2 << 30  # inflated size of all members together (2 GiB)
    max_ratio: float = 100.0  # inflated / compressed size of a zip member or a compressed tar
    ratio_exempt_bytes: int = 1 << 20  # a member (or tar stream) smaller than this may exceed it

    def __post_init__(self) -> None:
        for field in ("max_members", "max_total_bytes", "max_ratio"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ArchiveLimits.{field} must be > 0, got {getattr(self, field)}")
        if self.ratio_exempt_bytes < 0:
            raise ValueError(
                f"ArchiveLimits.ratio_exempt_bytes must be >= 0, got {self.ratio_exempt_bytes}"
            )


@dataclass(frozen=True)
class ArchiveMember:
    """One member as its header declares it; ``name`` is the cleaned relative path."""

    name: str
    size: int  # declared inflated size (0 for a folder)
    is_dir: bool
    compressed_size: int | None = None  # a zip member's stored size; None in a tar


@dataclass(frozen=True)
class ArchiveListing:
    """An archive's members, in archive order (the archive's root entry, ``./``, left out)."""

    kind: str  # "zip", "tar", "tar.gz", "tar.bz2" or "tar.xz"
    members: tuple[ArchiveMember, ...]

    @property
    def total_bytes(self) -> int:
        """Declared inflated size of all members."""
        return sum(m.size for m in self.members)

    @property
    def files(self) -> tuple[ArchiveMember, ...]:
        return tuple(m for m in self.members if not m.is_dir)


def inspect_archive(path: Path, limits: ArchiveLimits | None = None) -> ArchiveListing:
    """The members of the zip or tar at ``path``, checked against every rule; inflates no data.

    Raises :class:`ArchiveError` for a file that is not a readable zip or tar, or one that
    breaks a rule. A compressed tar is inflated to read its headers (its data is discarded),
    within the limits.
    """
    limits = limits or ArchiveLimits()
    kind = _archive_kind(Path(path))
    if kind == "zip":
        with _open_zip(Path(path), limits) as archive:
            return ArchiveListing(kind, tuple(m for _, m in _zip_members(archive, limits)))
    with _open_tar(Path(path), kind, limits) as (archive, guard):
        members = tuple(m for _, m in _tar_members(archive, limits, guard))
    return ArchiveListing(kind, members)


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits | None = None) -> list[Path]:
    """Extract the zip or tar at ``path`` into the new folder ``dest``; the files written.

    ``dest`` must not exist (it is created, with any missing parents). The archive is listed
    and checked first; during extraction the inflated bytes are counted against each member's
    declared size and ``max_total_bytes``. On any error, :class:`ArchiveError` or not,
    ``dest`` is removed with everything in it. Returns the regular files, in archive order.
    """
    limits = limits or ArchiveLimits()
    path, dest = Path(path), Path(dest)
    listing = inspect_archive(path, limits)
    dest.mkdir(parents=True)
    try:
        budget = _Budget(limits.max_total_bytes)
        if listing.kind == "zip":
            with _open_zip(path, limits) as archive:
                return _extract_zip(archive, path, limits, dest, budget)
        with _open_tar(path, listing.kind, limits) as (archive, guard):
            return _extract_tar(archive, limits, guard, dest, budget)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


# ---- shared rules ---------------------------------------------------------------------------


def _clean_name(name: str) -> str:
    """The member's relative path, or :class:`ArchiveError` for a name that could escape."""
    if "\x00" in name:
        raise ArchiveError(f"member {name!r}: a NUL byte in its name")
    if "\\" in name:
        raise ArchiveError(f"member {name!r}: a backslash in its name (use / between folders)")
    if name.startswith("/"):
        raise ArchiveError(f"member {name!r}: an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"member {name!r}: a '..' component (it would land outside)")
    return "/".join(parts)


class _Names:
    """The names seen so far: refuses duplicate files and names both file and folder."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def add(self, name: str, is_dir: bool) -> None:
        parents = name.split("/")[:-1]
        for depth in range(1, len(parents) + 1):
            parent = "/".join(parents[:depth])
            if parent in self.files:
                raise ArchiveError(f"member {name!r}: {parent!r} is both a file and a folder")
            self.dirs.add(parent)
        if name in self.files or (not is_dir and name in self.dirs):
            kind = "folder" if name in self.dirs else "file"
            raise ArchiveError(f"member {name!r}: a second member of that name (a {kind})")
        (self.dirs if is_dir else self.files).add(name)


class _Counter:
    """Members and declared bytes so far, refused as soon as either passes its limit."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def add(self, name: str, size: int) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(
                f"member {name!r}: more than {self.limits.max_members} members in the archive"
            )
        self.bytes += size
        if self.bytes > self.limits.max_total_bytes:
            raise ArchiveError(
                f"member {name!r}: the members declare more than {self.limits.max_total_bytes} "
                "bytes in all"
            )


class _Budget:
    """Bytes actually written, against ``max_total_bytes``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, name: str, count: int) -> None:
        self.used += count
        if self.used > self.limit:
            raise ArchiveError(
                f"member {name!r}: the archive inflates past {self.limit} bytes in all"
            )


def _copy_member(
    chunks: Iterator[bytes], member: ArchiveMember, dest: Path, budget: _Budget
) -> Path:
    """Write ``member``'s inflated ``chunks`` under ``dest``, counting every byte.

    ``chunks`` yields at most ``_CHUNK`` bytes at a time, so a lying header is stopped within
    one chunk of the size it declares.
    """
    target = dest.joinpath(*member.name.split("/"))
    if not target.resolve().is_relative_to(dest.resolve()):  # the name rules make this hold
        raise ArchiveError(f"member {member.name!r}: its path leaves the destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as out:
        for chunk in chunks:
            written += len(chunk)
            if written > member.size:
                raise ArchiveError(
                    f"member {member.name!r}: inflates past the {member.size} bytes its header "
                    "declares"
                )
            budget.take(member.name, len(chunk))
            out.write(chunk)
    if written < member.size:
        raise ArchiveError(
            f"member {member.name!r}: holds {written} bytes, its header declares {member.size}"
        )
    return target


def _archive_kind(path: Path) -> str:
    """``zip``, ``tar`` or ``tar.<compression>``, from the file's first bytes (not its name)."""
    with path.open("rb") as handle:
        head = handle.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    for magic, kind in _COMPRESSIONS.items():
        if head.startswith(magic):
            return kind
    return "tar"  # or nothing: opening it as a plain tar says which


# ---- zip ------------------------------------------------------------------------------------

_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_ZIP_LOCAL_HEADER = 30  # bytes before the name and the extra field


class _open_zip:  # noqa: N801 (a context manager used like a function)
    """The ``zipfile.ZipFile``, once the end record's member count and directory size fit."""

    def __init__(self, path: Path, limits: ArchiveLimits) -> None:
        self.path, self.limits = path, limits

    def __enter__(self) -> zipfile.ZipFile:
        entries, directory_bytes = _zip_end_record(self.path)
        if entries > self.limits.max_members:
            raise ArchiveError(
                f"the zip declares {entries} members; at most {self.limits.max_members} "
                "are accepted"
            )
        if directory_bytes > self.limits.max_members * _MAX_DIRECTORY_ENTRY:
            raise ArchiveError(
                f"the zip's central directory is {directory_bytes} bytes, more than "
                f"{self.limits.max_members} members can need"
            )
        try:
            self.archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise ArchiveError(f"not a readable zip archive: {error}") from None
        return self.archive

    def __exit__(self, *exc: object) -> None:
        self.archive.close()


def _zip_end_record(path: Path) -> tuple[int, int]:
    """(members, central directory bytes) that the zip's end record declares.

    Read before ``zipfile`` parses the directory, so a zip declaring millions of members is
    refused without building them.
    """
    with path.open("rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        start = max(0, size - (22 + 0xFFFF))  # the record, then a comment of up to 64 KiB
        handle.seek(start)
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            raise ArchiveError("not a readable zip archive: no end-of-central-directory record")
        entries, directory_bytes = struct.unpack("<2xHI", tail[at + 8 : at + 16])
        locator = tail[at - 20 : at] if at >= 20 else b""
        if (entries == 0xFFFF or directory_bytes == 0xFFFFFFFF) and locator[:4] == b"PK\x06\x07":
            (offset,) = struct.unpack("<Q", locator[8:16])
            handle.seek(offset)
            record = handle.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                entries, directory_bytes = struct.unpack("<QQ", record[32:48])
    return entries, directory_bytes


def _zip_members(
    archive: zipfile.ZipFile, limits: ArchiveLimits
) -> Iterator[tuple[zipfile.ZipInfo, ArchiveMember]]:
    """Every member, checked, with its ``ZipInfo``; the archive's root entry is skipped."""
    counter, names = _Counter(limits), _Names()
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise ArchiveError(
            f"the zip holds {len(infos)} members; at most {limits.max_members} are accepted"
        )
    for info in infos:
        raw = info.filename
        name = _clean_name(raw)
        mode = info.external_attr >> 16
        is_dir = info.is_dir() or stat.S_ISDIR(mode)
        unix_type = stat.S_IFMT(mode) if info.create_system == 3 else 0  # 0: no Unix mode
        if unix_type and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise ArchiveError(f"member {raw!r}: a {_file_type(mode)}, not a regular file")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"member {raw!r}: encrypted")
        if not is_dir and info.compress_type not in _ZIP_METHODS:
            raise ArchiveError(
                f"member {raw!r}: compression method {info.compress_type}; only stored and "
                "deflated members are read"
            )
        if not name:
            if is_dir:
                continue
            raise ArchiveError(f"member {raw!r}: a file without a name")
        size = 0 if is_dir else info.file_size
        counter.add(raw, size)
        if size > limits.ratio_exempt_bytes and size > limits.max_ratio * info.compress_size:
            raise ArchiveError(
                f"member {raw!r}: declares {size} bytes from {info.compress_size} compressed, "
                f"a ratio above {limits.max_ratio:g} (a zip bomb)"
            )
        names.add(name, is_dir)
        yield info, ArchiveMember(name, size, is_dir, info.compress_size)


def _extract_zip(
    archive: zipfile.ZipFile, path: Path, limits: ArchiveLimits, dest: Path, budget: _Budget
) -> list[Path]:
    written = []
    with path.open("rb") as handle:
        for info, member in _zip_members(archive, limits):
            if member.is_dir:
                dest.joinpath(*member.name.split("/")).mkdir(parents=True, exist_ok=True)
                continue
            chunks = _zip_member_chunks(handle, info)
            written.append(_copy_member(chunks, member, dest, budget))
    return written


def _zip_member_chunks(handle: IO[bytes], info: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's inflated bytes, at most ``_CHUNK`` at a time, however many there are.

    Inflated here rather than by ``zipfile``, which cuts a member off at the size its header
    declares: a longer stream must be seen, to be refused. The CRC-32 is checked at the end.
    """
    raw = info.filename
    handle.seek(info.header_offset)
    header = handle.read(_ZIP_LOCAL_HEADER)
    if len(header) < _ZIP_LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise ArchiveError(f"member {raw!r}: no local header where the directory points")
    flags, name_length, extra_length = struct.unpack("<6xH18xHH", header)
    try:
        local_name = handle.read(name_length).decode("utf-8" if flags & 0x800 else "cp437")
    except UnicodeDecodeError:
        local_name = None
    if local_name != info.orig_filename:
        raise ArchiveError(f"member {raw!r}: its local header names {local_name!r}")
    handle.seek(extra_length, io.SEEK_CUR)
    inflater = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    left, crc = info.compress_size, 0
    try:
        while left > 0:
            data = handle.read(min(left, _CHUNK))
            if not data:
                raise ArchiveError(f"member {raw!r}: the archive ends inside its data")
            left -= len(data)
            while data:
                if inflater is None:
                    out, data = data, b""
                else:
                    out = inflater.decompress(data, _CHUNK)
                    data = inflater.unconsumed_tail
                crc = zlib.crc32(out, crc)
                yield out
        if inflater is not None:
            out = inflater.flush()  # the last bytes of a stream already read: bounded
            crc = zlib.crc32(out, crc)
            yield out
            if not inflater.eof:
                raise ArchiveError(f"member {raw!r}: its deflate stream is truncated")
    except zlib.error as error:
        raise ArchiveError(f"member {raw!r}: corrupt deflate data: {error}") from None
    if crc != info.CRC:
        raise ArchiveError(f"member {raw!r}: corrupt data (CRC-32 mismatch)")


# ---- tar ------------------------------------------------------------------------------------

_COMPRESSIONS: dict[bytes, str] = {
    b"\x1f\x8b": "tar.gz",
    b"BZh": "tar.bz2",
    b"\xfd7zXZ\x00": "tar.xz",
}
_DECOMPRESSORS: dict[str, Callable[[Path], io.BufferedIOBase]] = {
    "tar.gz": gzip.GzipFile,
    "tar.bz2": bz2.BZ2File,
    "tar.xz": lzma.LZMAFile,
}
_TAR_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
_TAR_TYPES = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


class _InflationGuard(io.RawIOBase):
    """A compressed tar's inflated stream that stops past ``max_ratio`` x the file or the cap.

    The cap is the members' bytes (``max_total_bytes``) plus their headers and padding.
    ``member`` names the member being read, for the message.
    """

    def __init__(self, stream: io.BufferedIOBase, compressed: int, limits: ArchiveLimits) -> None:
        super().__init__()
        self.stream = stream
        self.inflated = 0
        self.member: str | None = None
        ratio_cap = max(limits.max_ratio * compressed, limits.ratio_exempt_bytes)
        size_cap = limits.max_total_bytes + (limits.max_members + 8) * _TAR_OVERHEAD
        if ratio_cap < size_cap:
            self.cap = int(ratio_cap)
            self.problem = (
                f"inflates past {limits.max_ratio:g} times its {compressed} compressed bytes "
                "(a decompression bomb)"
            )
        else:
            self.cap = size_cap
            self.problem = f"inflates past {size_cap} bytes"

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.stream.readinto(buffer)
        self.inflated += count
        if self.inflated > self.cap:
            where = f"member {self.member!r}: " if self.member else ""
            raise ArchiveError(f"{where}the compressed tar {self.problem}")
        return count


class _open_tar:  # noqa: N801 (a context manager used like a function)
    """The ``TarFile`` and its inflation guard (None for a plain tar, read with seeks)."""

    def __init__(self, path: Path, kind: str, limits: ArchiveLimits) -> None:
        self.path, self.kind, self.limits = path, kind, limits
        self.stream: io.BufferedIOBase | None = None

    def __enter__(self) -> tuple[tarfile.TarFile, _InflationGuard | None]:
        guard = None
        try:
            if self.kind == "tar":
                self.archive = tarfile.open(self.path, mode="r:")
            else:
                self.stream = _DECOMPRESSORS[self.kind](self.path)
                compressed = self.path.stat().st_size
                guard = _InflationGuard(self.stream, compressed, self.limits)
                # Stream mode: headers and data in order, read through the guard only.
                self.archive = tarfile.open(fileobj=guard, mode="r|")
        except ArchiveError:
            self._close_stream()
            raise
        except _TAR_READ_ERRORS as error:
            self._close_stream()
            raise ArchiveError(f"not a readable zip or tar archive: {error}") from None
        return self.archive, guard

    def __exit__(self, *exc: object) -> None:
        self.archive.close()
        self._close_stream()

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()


def _tar_members(
    archive: tarfile.TarFile, limits: ArchiveLimits, guard: _InflationGuard | None
) -> Iterator[tuple[tarfile.TarInfo, ArchiveMember]]:
    """Every member, checked, with its ``TarInfo``; the archive's root entry is skipped."""
    counter, names = _Counter(limits), _Names()
    iterator = iter(archive)
    while True:
        try:
            info = next(iterator)
        except StopIteration:
            return
        except _TAR_READ_ERRORS as error:
            where = f" after member {guard.member!r}" if guard and guard.member else ""
            raise ArchiveError(f"not a readable tar archive{where}: {error}") from None
        raw = info.name
        if guard is not None:
            guard.member = raw
        name = _clean_name(raw)
        if not (info.isreg() or info.isdir()) or info.issparse():
            kind = "sparse file" if info.issparse() else _TAR_TYPES.get(info.type, "special file")
            target = f" to {info.linkname!r}" if info.issym() or info.islnk() else ""
            raise ArchiveError(f"member {raw!r}: a {kind}{target}, not a regular file")
        if not name:
            if info.isdir():
                continue
            raise ArchiveError(f"member {raw!r}: a file without a name")
        size = 0 if info.isdir() else info.size
        counter.add(raw, size)
        names.add(name, info.isdir())
        yield info, ArchiveMember(name, size, info.isdir())


def _extract_tar(
    archive: tarfile.TarFile,
    limits: ArchiveLimits,
    guard: _InflationGuard | None,
    dest: Path,
    budget: _Budget,
) -> list[Path]:
    written = []
    for info, member in _tar_members(archive, limits, guard):
        if member.is_dir:
            dest.joinpath(*member.name.split("/")).mkdir(parents=True, exist_ok=True)
            continue
        try:
            source = archive.extractfile(info)
        except _TAR_READ_ERRORS as error:
            raise ArchiveError(f"member {info.name!r}: unreadable: {error}") from None
        if source is None:  # only links and specials have no data, and those were refused
            raise ArchiveError(f"member {info.name!r}: no data")
        with source:
            written.append(_copy_member(_tar_member_chunks(source, info), member, dest, budget))
    return written


def _tar_member_chunks(source: IO[bytes], info: tarfile.TarInfo) -> Iterator[bytes]:
    """The member's bytes, ``_CHUNK`` at a time (a tar member's data is its declared size)."""
    while True:
        try:
            chunk = source.read(_CHUNK)
        except _TAR_READ_ERRORS as error:
            raise ArchiveError(f"member {info.name!r}: unreadable data: {error}") from None
        if not chunk:
            return
        yield chunk


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"
