"""One file API for local paths and remote URIs (`s3://`, `gs://`, ...) via `pyarrow.fs`.

Every function takes a *location*: a local path (str or os.PathLike, relative paths are
made absolute) or a URI understood by `pyarrow.fs.FileSystem.from_uri`. `s3://` URIs
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
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

Location = str | os.PathLike


def is_uri(location: Location) -> bool:
    """True for `scheme://...` locations (Windows drive letters are local paths)."""
    text = os.fspath(location)
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
    text = os.fspath(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    if parts.scheme == "s3" and not parts.query:
        return _s3_filesystem(text), (parts.netloc + parts.path).rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(text)
    return filesystem, path.rstrip("/") or path


def join(location: Location, *parts: str) -> str:
    """`location/part/...` as a string, keeping the URI scheme if there is one."""
    text = os.fspath(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def _split_parent(location: Location) -> tuple[str, str]:
    text = os.fspath(location).rstrip("/")
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
    gz = decompress and os.fspath(location).endswith(".gz")
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
    filesystem, path = resolve(location)
    parent = posixpath.dirname(path) if is_uri(location) else os.path.dirname(path)
    if parent:
        filesystem.create_dir(parent, recursive=True)
    with filesystem.open_output_stream(path, compression=None) as stream:
        stream.write(data)


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
