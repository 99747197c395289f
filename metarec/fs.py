"""One file API for local paths and remote URIs (`s3://`, `gs://`, ...) via `pyarrow.fs`.

Every function takes a *location*: a local path (str or os.PathLike, relative paths are
made absolute; `file:///path` is the local path `/path`, `local_path`) or a URI
understood by `pyarrow.fs.FileSystem.from_uri`. `s3://` URIs
get an `S3FileSystem` whose endpoint comes from `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (e.g. MinIO, or a moto server in tests) and that may create buckets.

Writes that must never be seen half-done go through `atomic_dir` / `atomic_write_bytes`:
the content is written to a hidden temp sibling and then moved into place. On a local
file system the move is a `rename` (atomic). Object stores have no rename: there the
move is copy + delete, so a reader may briefly see some files of the new directory;
files named in `last` (by default `manifest.json`) are copied last, so a reader that
keys on them never sees an incomplete directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

Location = str | os.PathLike


def local_path(location: Location) -> str:
    """`location` as a string, a `file://` URI turned into the local path it names.

    A `file://` location is a local path in every respect (the run directory's lock,
    atomic renames), not an object store: `file:///abs/path` (or `file://localhost/...`)
    is `/abs/path`; a `file://` URI naming another host is refused."""
    text = os.fspath(location)
    if not text[:7].lower() == "file://":
        return text
    parts = urlsplit(text)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        from metarec.errors import ConfigError

        raise ConfigError(f"{text}: a file:// location must name a local path (file:///absolute/path)")
    from urllib.parse import unquote

    return unquote(parts.path) or "/"


def is_uri(location: Location) -> bool:
    """True for `scheme://...` object-store locations (`file://` and Windows drive letters are local paths)."""
    text = local_path(location)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1


def _s3_filesystem(uri: str) -> pafs.S3FileSystem:
    options: dict = {"allow_bucket_creation": True}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def resolve(location: Location) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or URI."""
    text = local_path(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    if parts.scheme == "s3" and not parts.query:
        return _s3_filesystem(text), (parts.netloc + parts.path).rstrip("/")
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except pa.ArrowInvalid as err:  # an unknown scheme, or a URI pyarrow cannot use
        from metarec.errors import ConfigError, bounded

        raise ConfigError(f"{bounded(text, 200)}: not a usable location ({bounded(str(err), 200)}); "
                          "use a local path, file:///path, s3://bucket/path or gs://bucket/path") from None
    return filesystem, path.rstrip("/") or path


def join(location: Location, *parts: str) -> str:
    """`location/part/...` as a string, keeping the URI scheme if there is one."""
    text = local_path(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def _split_parent(location: Location) -> tuple[str, str]:
    text = local_path(location).rstrip("/")
    if is_uri(text):
        return posixpath.dirname(text), posixpath.basename(text)
    text = os.path.abspath(os.path.expanduser(text))
    return os.path.dirname(text), os.path.basename(text)


def exists(location: Location) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def isdir(location: Location) -> bool:
    filesystem, path = resolve(location)
    return filesystem.get_file_info(path).type == pafs.FileType.Directory


def size(location: Location) -> int:
    """Size in bytes of a file (FileNotFoundError if there is none)."""
    filesystem, path = resolve(location)
    info = filesystem.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(location)}: no such file")
    return int(info.size)


def makedirs(location: Location) -> None:
    filesystem, path = resolve(location)
    filesystem.create_dir(path, recursive=True)


def listdir(location: Location, include_hidden: bool = False) -> list[str]:
    """Sorted names of the entries of a directory (without `.`-names unless asked)."""
    filesystem, path = resolve(location)
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(posixpath.basename(info.path.rstrip("/")) for info in infos)
    return [n for n in names if include_hidden or not n.startswith(".")]


def remove(location: Location) -> None:
    """Delete a file or a directory tree (no error if there is nothing)."""
    filesystem, path = resolve(location)
    kind = filesystem.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif kind == pafs.FileType.File:
        filesystem.delete_file(path)


def open_input(location: Location, decompress: bool = True):
    """Binary input stream (a context manager); `.gz` files are gunzipped unless `decompress=False`."""
    filesystem, path = resolve(location)
    gz = decompress and local_path(location).endswith(".gz")
    return filesystem.open_input_stream(path, compression="gzip" if gz else None)


def open_input_file(location: Location):
    """Random-access binary input file (a context manager), e.g. for `pyarrow.parquet.ParquetFile`."""
    filesystem, path = resolve(location)
    return filesystem.open_input_file(path)


def read_bytes(location: Location) -> bytes:
    """The stored bytes of a file, as is (no decompression)."""
    with open_input(location, decompress=False) as stream:
        return stream.read()


def read_text(location: Location, encoding: str = "utf-8") -> str:
    """Text of a file (`.gz` gunzipped)."""
    with open_input(location) as stream:
        return stream.read().decode(encoding)


def write_bytes(location: Location, data: bytes) -> None:
    """Write a file, creating its parent directories (not atomic: see `atomic_write_bytes`)."""
    location = local_path(location)
    filesystem, path = resolve(location)
    parent = posixpath.dirname(path) if is_uri(location) else os.path.dirname(path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    try:
        with filesystem.open_output_stream(path, compression=None) as stream:
            stream.write(data)
    except OSError as err:
        raise _with_filename(err, location) from None


def _with_filename(err: OSError, location: str) -> OSError:
    """`err` naming the file it happened on (pyarrow's write errors name none), with its errno."""
    if err.filename:
        return err
    code = err.errno
    if code is None:
        found = re.search(r"\[errno (\d+)\]", str(err))
        code = int(found.group(1)) if found else None
    if code is None:
        return OSError(None, str(err), location)
    return OSError(code, os.strerror(code), location)


def atomic_write_bytes(location: Location, data: bytes) -> None:
    """Write a file so that readers see either the old or the complete new content.

    Local: temp sibling + rename. Object stores: a single PUT is already atomic.
    """
    if is_uri(location):
        write_bytes(location, data)
        return
    parent, base = _split_parent(location)
    tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, os.path.join(parent, base))
    except BaseException:
        remove(tmp)
        raise


def temp_sibling(location: Location, kind: str = "tmp") -> str:
    """A new hidden name next to `location`: `.NAME.KIND-<32 hex digits>`."""
    parent, base = _split_parent(location)
    return join(parent, f".{base}.{kind}-{uuid.uuid4().hex}")


def open_output(location: Location):
    """Binary output stream (a context manager) of a new file, creating its parent directories."""
    filesystem, path = resolve(location)
    parent = posixpath.dirname(path) if is_uri(location) else os.path.dirname(path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    return filesystem.open_output_stream(path, compression=None)


@contextlib.contextmanager
def atomic_file(location: Location) -> Iterator[str]:
    """Yield a hidden temp sibling of `location` to write (e.g. streamed through `open_output`);
    on success move it into place, on error delete it, so readers never see a partial file.

    Local: rename. Object stores: a server-side copy (the object appears whole) and a
    delete; a streamed upload is not written to `location` directly because closing an
    interrupted multipart upload would publish what it holds so far.
    """
    parent, base = _split_parent(location)
    dest = join(parent, base)
    if isdir(dest):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file", dest)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if is_uri(dest):
            filesystem, tmp_path = resolve(tmp)
            filesystem.copy_file(tmp_path, resolve(dest)[1])
            filesystem.delete_file(tmp_path)
        else:
            os.replace(tmp, dest)
    except BaseException:
        remove(tmp)
        raise


def _move_tree(filesystem: pafs.FileSystem, src: str, dest: str, last: tuple[str, ...]) -> None:
    """Object-store 'rename' of a directory: copy every file (those named in `last` last), delete the source."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.move(src, dest)
        return
    infos = filesystem.get_file_info(pafs.FileSelector(src, recursive=True))
    files = [info.path for info in infos if info.type == pafs.FileType.File]
    files.sort(key=lambda p: (posixpath.basename(p) in last, p))
    filesystem.create_dir(dest, recursive=True)
    for path in files:
        filesystem.copy_file(path, dest + path[len(src) :])
    filesystem.delete_dir(src)


@contextlib.contextmanager
def atomic_dir(location: Location, replace: bool = False, last: tuple[str, ...] = ("manifest.json",)) -> Iterator[str]:
    """Yield a temp sibling directory to fill; on success move it to `location`, on error delete it.

    If `location` exists: `replace=False` raises FileExistsError (nothing is written),
    `replace=True` swaps the new directory in and deletes the old one. On object stores the
    move is copy + delete (see the module docstring), and a replaced directory is deleted
    before the copy, so there the swap is not atomic.
    """
    parent, base = _split_parent(location)
    dest = join(parent, base)
    if exists(dest) and not replace:
        raise FileExistsError(f"{dest} already exists")
    tmp = join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
    makedirs(tmp)
    try:
        yield tmp
        filesystem, tmp_path = resolve(tmp)
        _, dest_path = resolve(dest)
        old = None
        if exists(dest):
            if not replace:
                raise FileExistsError(f"{dest} already exists")
            if isinstance(filesystem, pafs.LocalFileSystem):
                if _exchange(tmp_path, dest_path):  # one atomic step: `dest` is never missing
                    remove(tmp)  # now the old content
                    return
                old = join(parent, f".{base}.old-{uuid.uuid4().hex}")
                filesystem.move(dest_path, resolve(old)[1])
            else:
                filesystem.delete_dir(dest_path)
        _move_tree(filesystem, tmp_path, dest_path, last)
        if old is not None:
            remove(old)
    except BaseException:
        remove(tmp)
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two local paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28, some musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange: the two renames
        return False
    raise OSError(err, os.strerror(err), b)


def swap_leftovers(location: Location) -> list[str]:
    """Local `.NAME.old-*` siblings of `location`: its previous version, left by a replace
    (`atomic_dir(replace=True)`) that was interrupted between its two renames; newest first."""
    if is_uri(location):
        return []
    parent, base = _split_parent(location)
    prefix = f".{base}.old-"
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except FileNotFoundError:
        return []
    paths = []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            paths.append((os.stat(os.path.join(parent, name)).st_mtime_ns, os.path.join(parent, name)))
    return [p for _, p in sorted(paths, reverse=True)]


SWAP_RETRIES = 1000


def read_dir_files(location: Location, names: tuple[str, ...]) -> dict[str, bytes]:
    """The files `names` of directory `location`, all from one version of it.

    Local directories may be replaced (`atomic_dir(replace=True)`) while they are read:
    the files are read through one open handle of the directory, so they come from the
    same version; a version deleted while it is read, or a directory caught between the
    two renames of a replace (then its previous version, `swap_leftovers`, is read), is
    tried again (at most SWAP_RETRIES times). FileNotFoundError if the directory or a
    file is missing (and no replace is under way)."""
    if is_uri(location):
        for name in names:
            if not exists(join(location, name)):
                raise FileNotFoundError(errno.ENOENT, "no such file", join(location, name))
        return {name: read_bytes(join(location, name)) for name in names}
    path = resolve(location)[1]
    absent = 0  # iterations in a row that found neither the directory nor a previous version
    for _ in range(SWAP_RETRIES):
        candidates = [path, *swap_leftovers(path)]
        for candidate in candidates:
            try:
                dir_fd = os.open(candidate, os.O_RDONLY | os.O_DIRECTORY)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                out = {}
                for name in names:
                    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
                    with os.fdopen(fd, "rb") as f:
                        out[name] = f.read()
                return out
            except FileNotFoundError:
                if candidate == path and _same_dir(dir_fd, path):  # this version lacks the file
                    raise FileNotFoundError(errno.ENOENT, "no such file", os.path.join(path, name)) from None
            finally:
                os.close(dir_fd)
        # Checked directory, leftovers, directory again: a replace between its two renames
        # always shows one of them. Missing twice in a row means no replace is under way.
        absent = absent + 1 if not os.path.isdir(path) and not swap_leftovers(path) and not os.path.isdir(path) else 0
        if absent == 2:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)
        time.sleep(0.001)
    raise FileNotFoundError(errno.ENOENT, f"still being replaced after {SWAP_RETRIES} tries", path)


def _same_dir(dir_fd: int, path: str) -> bool:
    """Whether `path` still names the directory open as `dir_fd` (it was not swapped away)."""
    try:
        a, b = os.fstat(dir_fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
