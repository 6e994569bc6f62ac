"""core.archives: untrusted zips and tars listed and
extracted, or refused leaving nothing.

Every archive here is a real file written by the test: with zipfile and tarfile where they can
write the attack, with a patched header where only a lying archive can (a declared size that
differs from the data). Each refusal checks the message names the member and that the
destination does not exist afterwards.
"""

from __future__ import annotations

import io
import stat
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest

from core.archives import (
    ArchiveError,
    ArchiveLimits,
    ArchiveMember,
    extract_archive,
    inspect_archive,
)

FILES = {"train/cat/0.png": b"cat pixels" * 50, "train/dog/0.png": b"\x00\x01" * 300}
TarMode = Literal["w", "w:gz", "w:bz2", "w:xz"]
TAR_MODES: dict[str, TarMode] = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}


def _zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tar_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info


def _tar(path: Path, members: dict[str, bytes], kind: str = "tar") -> Path:
    """A tar of ``members``; a name ending in ``/`` is a folder entry."""
    with tarfile.open(path, TAR_MODES[kind]) as archive:
        for name, data in members.items():
            if name.endswith("/"):
                archive.addfile(_tar_info(name, kind=tarfile.DIRTYPE))
            else:
                archive.addfile(_tar_info(name, len(data)), io.BytesIO(data))
    return path


def _refused(path: Path, dest: Path, match: str, limits: ArchiveLimits | None = None) -> str:
    """Both functions refuse ``path`` with a message matching ``match``; nothing is left."""
    with pytest.raises(ArchiveError, match=match):
        inspect_archive(path, limits)
    with pytest.raises(ArchiveError, match=match) as info:
        extract_archive(path, dest, limits)
    assert not dest.exists()
    return str(info.value)


def _patch_zip_sizes(path: Path, *, file_size: int) -> None:
    """Rewrite the one member's declared inflated size in its local and central headers."""
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 22 : local + 26] = struct.pack("<I", file_size)
    data[central + 24 : central + 28] = struct.pack("<I", file_size)
    path.write_bytes(bytes(data))


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, produced as they are read (a bomb written without holding it)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


# ---- what is accepted -----------------------------------------------------------------------


def test_zip_is_listed_and_extracted_byte_for_byte(tmp_path: Path) -> None:
    path = _zip(tmp_path / "pets.zip", {"./test/": b"", **FILES, "test/cat/1.png": b"x"})
    listing = inspect_archive(path)
    assert listing.kind == "zip"
    assert [m.name for m in listing.members] == ["test", *FILES, "test/cat/1.png"]
    assert listing.members[0] == ArchiveMember("test", 0, True, listing.members[0].compressed_size)
    assert listing.total_bytes == sum(len(d) for d in FILES.values()) + 1
    assert [m.name for m in listing.files] == [*FILES, "test/cat/1.png"]

    written = extract_archive(path, tmp_path / "out")
    assert written == [tmp_path / "out" / name for name in [*FILES, "test/cat/1.png"]]
    for name, data in FILES.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert (tmp_path / "out" / "test").is_dir()


@pytest.mark.parametrize("kind", list(TAR_MODES))
def test_tar_of_every_compression_is_listed_and_extracted(tmp_path: Path, kind: str) -> None:
    path = _tar(tmp_path / f"pets.{kind}", {"./": b"", **FILES, "train/bird/": b""}, kind)
    listing = inspect_archive(path)
    assert listing.kind == kind
    assert [m.name for m in listing.members] == [*FILES, "train/bird"]  # "./" left out
    assert [m.name for m in listing.files] == list(FILES)
    assert all(m.compressed_size is None for m in listing.members)
    written = extract_archive(path, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written] == list(FILES)
    for name, data in FILES.items():
        assert (tmp_path / "out" / name).read_bytes() == data
    assert (tmp_path / "out" / "train" / "bird").is_dir()


def test_zip_with_stored_members_is_extracted(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", FILES, method=zipfile.ZIP_STORED)
    extract_archive(path, tmp_path / "out")
    assert (tmp_path / "out" / "train/dog/0.png").read_bytes() == FILES["train/dog/0.png"]


def test_small_files_of_repeated_bytes_are_exempt_from_the_ratio(tmp_path: Path) -> None:
    # 100 KB of zeros deflate ~1000x: a legitimate small file, well under ratio_exempt_bytes.
    path = _zip(tmp_path / "a.zip", {"blank.bin": bytes(100_000)})
    assert inspect_archive(path).files[0].size == 100_000
    extract_archive(path, tmp_path / "out")


def test_listing_inflates_nothing(tmp_path: Path) -> None:
    """A zip whose member data is garbage lists fine: only the central directory is read."""
    path = _zip(tmp_path / "a.zip", {"x.bin": bytes(range(256)) * 40})
    data = bytearray(path.read_bytes())
    start = data.find(b"PK\x03\x04") + 30 + len("x.bin")
    data[start : start + 64] = b"\xff" * 64  # corrupt deflate data
    path.write_bytes(bytes(data))
    assert inspect_archive(path).files[0].name == "x.bin"
    with pytest.raises(ArchiveError, match=r"'x\.bin': corrupt"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extraction_needs_a_fresh_destination(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", FILES)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        extract_archive(path, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- names that could escape ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../evil.txt", "'..' component"),
        ("train/../../evil.txt", "'..' component"),
        ("/tmp/evil.txt", "absolute path"),
        ("train\\..\\evil.txt", "backslash"),
    ],
)
@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_a_member_name_that_could_escape_is_refused(
    tmp_path: Path, kind: str, name: str, problem: str
) -> None:
    members = {**FILES, name: b"pwned"}
    path = tmp_path / f"a.{kind}"
    _zip(path, members) if kind == "zip" else _tar(path, members, kind)
    message = _refused(path, tmp_path / "out", problem)
    assert repr(name) in message
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        (tarfile.SYMTYPE, "symbolic link to '/etc/passwd'"),
        (tarfile.LNKTYPE, "hard link to '/etc/passwd'"),
        (tarfile.CHRTYPE, "character device"),
        (tarfile.BLKTYPE, "block device"),
        (tarfile.FIFOTYPE, "FIFO"),
    ],
)
def test_a_tar_link_or_special_member_is_refused(tmp_path: Path, kind: bytes, problem: str) -> None:
    path = _tar(tmp_path / "a.tar", FILES)
    with tarfile.open(path, "a") as archive:
        info = _tar_info("train/cat/link.png", kind=kind)
        info.linkname = "/etc/passwd"
        archive.addfile(info)
    message = _refused(path, tmp_path / "out", problem)
    assert "'train/cat/link.png'" in message


@pytest.mark.parametrize(
    ("mode", "problem"),
    [(stat.S_IFLNK | 0o777, "symbolic link"), (stat.S_IFIFO | 0o644, "FIFO")],
)
def test_a_zip_member_whose_unix_mode_is_a_link_or_special_is_refused(
    tmp_path: Path, mode: int, problem: str
) -> None:
    path = _zip(tmp_path / "a.zip", FILES)
    with zipfile.ZipFile(path, "a") as archive:
        info = zipfile.ZipInfo("train/cat/link.png")
        info.create_system = 3  # Unix: external_attr's high 16 bits are st_mode
        info.external_attr = mode << 16
        archive.writestr(info, "/etc/passwd")
    message = _refused(path, tmp_path / "out", problem)
    assert "'train/cat/link.png'" in message


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_name_both_file_and_folder_is_refused(tmp_path: Path, kind: str) -> None:
    members = {"train": b"x", "train/cat/0.png": b"y"}
    path = tmp_path / f"a.{kind}"
    _zip(path, members) if kind == "zip" else _tar(path, members)
    _refused(path, tmp_path / "out", "'train/cat/0.png': 'train' is both a file and a folder")


def test_one_name_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.png", b"x")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("a.png", b"y")
    _refused(path, tmp_path / "out", "'a.png': a second member of that name")
    # In a tar, "./a.png" is "a.png": the second would overwrite the first.
    path = _tar(tmp_path / "twice.tar", {"a.png": b"x", "./a.png": b"y"})
    _refused(path, tmp_path / "out", "a.png': a second member of that name")


# ---- counts and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_too_many_members_are_refused(tmp_path: Path, kind: str) -> None:
    members = {f"train/c/{i}.png": b"x" for i in range(6)}
    path = tmp_path / f"a.{kind}"
    _zip(path, members) if kind == "zip" else _tar(path, members, kind)
    limits = ArchiveLimits(max_members=5)
    _refused(path, tmp_path / "out", "at most 5|more than 5 members", limits)
    assert len(inspect_archive(path, ArchiveLimits(max_members=6)).members) == 6


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz"])
def test_a_declared_total_above_the_cap_is_refused(tmp_path: Path, kind: str) -> None:
    members = {"a.bin": bytes(range(256)) * 3, "b.bin": bytes(range(256)) * 3}
    path = tmp_path / f"a.{kind}"
    _zip(path, members) if kind == "zip" else _tar(path, members, kind)
    limits = ArchiveLimits(max_total_bytes=1000)
    message = _refused(path, tmp_path / "out", "more than 1000 bytes in all", limits)
    assert "'b.bin'" in message


def test_a_zip_bomb_member_is_refused_by_its_ratio(tmp_path: Path) -> None:
    """200 MB of zeros deflated to ~200 KB (ratio ~1000), written streaming: refused at once."""
    path = tmp_path / "bomb.zip"
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("zeros.bin", "w") as member,
    ):
        for _ in range(200):
            member.write(bytes(1 << 20))
    assert path.stat().st_size < 1_000_000
    message = _refused(path, tmp_path / "out", "a ratio above 100 \\(a zip bomb\\)")
    assert "'zeros.bin'" in message and "209715200 bytes" in message


def test_a_zip_header_declaring_a_huge_size_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"big.bin": bytes(range(256)) * 4})
    _patch_zip_sizes(path, file_size=0xFFFF_FFF0)  # ~4 GiB, above the 2 GiB cap
    _refused(path, tmp_path / "out", "'big.bin': the members declare more than")


def test_a_compressed_tar_bomb_is_refused_while_reading_headers(tmp_path: Path) -> None:
    """A 50 MB member of zeros in a ~50 KB tar.gz: its stream inflates past 100x the file."""
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(_tar_info("zeros.bin", 50_000_000), io.BufferedReader(_Zeros(50_000_000)))
    assert path.stat().st_size < 200_000
    _refused(path, tmp_path / "out", "'zeros.bin': the compressed tar inflates past 100 times")


def test_a_lying_zip_header_is_stopped_during_extraction(tmp_path: Path) -> None:
    """Declared 1000 bytes, the data inflates to 300 KB: the listing cannot tell, the count can."""
    path = _zip(tmp_path / "a.zip", {"train/ok.png": b"fine", "train/liar.bin": bytes(300_000)})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature, data.find(signature) + 1)  # the second member's headers
        data[at + offset : at + offset + 4] = struct.pack("<I", 1000)
    path.write_bytes(bytes(data))
    assert inspect_archive(path).files[1].size == 1000  # the lie passes every header rule
    with pytest.raises(ArchiveError, match=r"'train/liar\.bin': inflates past the 1000 bytes"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # train/ok.png, extracted first, is gone too


def test_a_zip_header_declaring_more_than_the_data_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"short.bin": bytes(range(256)) * 4})
    _patch_zip_sizes(path, file_size=2048)
    with pytest.raises(ArchiveError, match=r"'short\.bin': holds 1024 bytes, its header declares"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_inflated_total_is_capped_during_extraction(tmp_path: Path) -> None:
    """Two lying members each within the cap by their headers, past it by their data."""
    path = _zip(tmp_path / "a.zip", {"a.bin": bytes(5000), "b.bin": bytes(5000)})
    data = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = -1
        for _ in range(2):
            at = data.find(signature, at + 1)
            data[at + offset : at + offset + 4] = struct.pack("<I", 4000)
    path.write_bytes(bytes(data))
    limits = ArchiveLimits(max_total_bytes=8000)
    with pytest.raises(ArchiveError, match=r"'a\.bin': inflates past the 4000 bytes"):
        extract_archive(path, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()


def test_a_corrupt_member_is_refused_by_its_crc(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"x.bin": b"abcdefgh" * 10}, method=zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.find(b"abcdefgh")
    data[at] = ord("z")
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=r"'x\.bin': corrupt data \(CRC-32 mismatch\)"):
        extract_archive(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- other refusals -------------------------------------------------------------------------


def test_an_encrypted_or_bzip2_zip_member_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"x.bin": b"x" * 100}, method=zipfile.ZIP_BZIP2)
    _refused(path, tmp_path / "out", "'x.bin': compression method 12")
    path = _zip(tmp_path / "b.zip", {"x.bin": b"x" * 100})
    data = bytearray(path.read_bytes())
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x1  # the "encrypted" flag
    path.write_bytes(bytes(data))
    _refused(path, tmp_path / "out", "'x.bin': encrypted")


@pytest.mark.parametrize(
    "content",
    [b"", b"just some text, not an archive" * 40, b"\x1f\x8b\x08\x00garbage", b"PK\x03\x04trunc"],
    ids=["empty", "text", "bad-gzip", "truncated-zip"],
)
def test_a_file_that_is_no_archive_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x").write_bytes(content)
    _refused(tmp_path / "x", tmp_path / "out", "not a readable")


@pytest.mark.parametrize(
    "make",
    [
        lambda: ArchiveLimits(max_members=0),
        lambda: ArchiveLimits(max_total_bytes=-1),
        lambda: ArchiveLimits(max_ratio=0),
        lambda: ArchiveLimits(ratio_exempt_bytes=-1),
    ],
)
def test_limits_must_be_positive(make: Callable[[], ArchiveLimits]) -> None:
    with pytest.raises(ValueError, match="ArchiveLimits"):
        make()
