"""Reading untrusted tar archives without letting their headers cost more than the archive's members may.

Python's tarfile reads an extended header (a pax 'x'/'g'/'X' header, a GNU long name 'L' or long link 'K')
whole into memory, and parses a pax header with a regex that is quadratic in a run of digits on this
Python (CVE-2024-6232), before the member it describes is returned to any member check: a gzip of a few
hundred bytes holding one header of a billion digits pins a CPU for hours. `GuardedTarFile` refuses, as each
header block is read and before its payload is: an extended header of more than MAX_EXTENDED_HEADER_BYTES,
more than MAX_EXTENDED_HEADERS_BYTES of them in one archive, more than MAX_CHAINED_HEADERS in a row before
one member, a negative size (tarfile would read the rest of the stream, or walk back over the archive
forever), and GNU sparse members in every encoding (no reader accepts them, and tarfile reads their maps
unbounded). The archives this project writes carry a small pax header per member (its float mtime, a long
name), far under these limits.

The refusal is an UnsafeTarHeader, a TarError but no HeaderError: tarfile turns a HeaderError from a
nested header into a ReadError, and takes an InvalidHeaderError past the first member for the end of the
archive.
"""

from __future__ import annotations

import tarfile

MAX_EXTENDED_HEADER_BYTES = (
    8 * 1024
)  # a name of PATH_MAX (4096) bytes and the rest; parsed in ~40 ms at worst
MAX_EXTENDED_HEADERS_BYTES = 128 * 1024  # all of one archive's extended headers together
MAX_CHAINED_HEADERS = 8  # a global header, a pax header, a GNU long name and long link need 4
_EXTENDED_TYPES = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE}
_GNU_LONG_TYPES = {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


class UnsafeTarHeader(tarfile.TarError):
    """A header refused before tarfile reads what it declares. The message completes "the archive …"."""


class _GuardedTarInfo(tarfile.TarInfo):
    """A TarInfo whose header is checked before tarfile processes it (`_proc_member`, which tarfile's own
    source names as the hook for subclasses, dispatches every header type, in stream mode too)."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        if not isinstance(archive, GuardedTarFile):
            raise TypeError("a _GuardedTarInfo is read by a GuardedTarFile only")
        if self.size < 0:
            raise UnsafeTarHeader(f"holds a header declaring {self.size} bytes; refused")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeTarHeader(f"holds {self.name}, a sparse file; refused")
        if self.type not in _EXTENDED_TYPES | _GNU_LONG_TYPES:
            member = self._processed(archive)
        else:
            if self.size > MAX_EXTENDED_HEADER_BYTES:
                raise UnsafeTarHeader(
                    f"holds an extended header of {self.size} bytes, "
                    f"more than the {MAX_EXTENDED_HEADER_BYTES} one may have; refused"
                )
            archive.extended_bytes += self.size
            if archive.extended_bytes > MAX_EXTENDED_HEADERS_BYTES:
                raise UnsafeTarHeader(
                    f"holds more than {MAX_EXTENDED_HEADERS_BYTES} bytes of extended headers; refused"
                )
            if archive.chained_headers >= MAX_CHAINED_HEADERS:
                raise UnsafeTarHeader(
                    f"holds more than {MAX_CHAINED_HEADERS} extended headers in a row; refused"
                )
            archive.chained_headers += 1  # the member's own header is read within, by a nested call
            try:
                member = self._processed(archive)
            finally:
                archive.chained_headers -= 1
        if member.size < 0:  # a pax header's size
            raise UnsafeTarHeader(f"holds {member.name}, declaring {member.size} bytes; refused")
        return member

    def _processed(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        return super()._proc_member(archive)  # type: ignore[misc]  # private, so not in typeshed

    # A pax header describing a GNU sparse file (formats 0.0, 0.1, 1.0), after the header of the file itself.
    def _proc_gnusparse_00(self, next: tarfile.TarInfo, *_: object) -> None:
        raise UnsafeTarHeader(f"holds {next.name}, a sparse file; refused")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


class GuardedTarFile(tarfile.TarFile):
    """tarfile.TarFile reading headers with the guards above: `GuardedTarFile.open(…)` as tarfile.open."""

    tarinfo = _GuardedTarInfo
    extended_bytes = 0  # this archive's extended headers so far
    chained_headers = 0  # extended headers read, in a row, before the member being read
