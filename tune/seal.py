"""The seal of a sweep store: what `metarec tune --resume` checks before Ray Tune unpickles anything.

`Tuner.restore` unpickles `tuner.pkl`, the cloudpickled trial states inside
`experiment_state-*.json`, searcher and callback state pickles and a failed trial's
`error.pkl`: whoever can write those files runs code on the next resume. So the sweep
that writes a store also writes `.metarec-seal.json` next to them: for every such file
(the *sealed* files, `sealed_file`), the SHA-256 digests of the versions this sweep
wrote, signed with HMAC-SHA256 under a secret that never leaves the user's machine
(`~/.config/metarec/tune-secret`, mode 0600, created on first use;
`METAREC_TUNE_SECRET_FILE` names another file). A resume first checks that every sealed
file in the store is one this user's sweep wrote (`verify`), and refuses the store
otherwise, before Tune reads it. The trials' run directories are not sealed: they hold
only safetensors and JSON, which metarec's own readers validate.

The seal is refreshed while the sweep runs (`SealCallback`, after Tune's state saves)
and when it ends, so a killed sweep can still be resumed from the versions it sealed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import posixpath
import secrets
import time

import pyarrow.fs as pafs
from ray.tune import Callback

from metarec import fs
from metarec.errors import ConfigError

SEAL_FILE = ".metarec-seal.json"
SECRET_ENV = "METAREC_TUNE_SECRET_FILE"
SEAL_VERSION = 1
KEEP_VERSIONS = 8  # digests kept per sealed file: the store may hold any version a recent save wrote
SECRET_BYTES = 32
OUTPUTS = {"results.json"}  # written by metarec at the end, read by no restore


def secret_path() -> str:
    return os.environ.get(SECRET_ENV) or os.path.join(os.path.expanduser("~"), ".config", "metarec", "tune-secret")


def load_secret(create: bool) -> bytes | None:
    """The user's sealing secret; created (0600, atomically) when missing and `create`."""
    path = secret_path()
    try:
        with open(path, "rb") as f:
            key = f.read()
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        key = secrets.token_bytes(SECRET_BYTES)
        tmp = f"{path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        try:
            os.link(tmp, path)  # never replaces a secret another process created meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        with open(path, "rb") as f:
            key = f.read()
    if len(key) < 16:
        raise ConfigError(f"{path}: the tune secret is shorter than 16 bytes; delete it to create a new one")
    return key


def sealed_file(relpath: str) -> bool:
    """Whether a file of the store (path relative to the experiment) is one a restore may unpickle.

    Every `.pkl` outside the trials' metarec run directories, every top-level `.json`
    (experiment, searcher and scheduler state) but metarec's results, and every
    `trial_metadata.json`."""
    parts = relpath.split("/")
    if len(parts) >= 3 and parts[1] == "run":  # <trial>/run/...: metarec's own run directory (safetensors + JSON)
        return False
    name = parts[-1]
    if name == SEAL_FILE:
        return False
    if name.endswith(".pkl") or name == "trial_metadata.json":
        return True
    return len(parts) == 1 and name.endswith(".json") and name not in OUTPUTS


def _digests(experiment_uri: str) -> dict[str, str]:
    """{relative path: sha256} of the sealed files now in the store."""
    filesystem, root = fs.resolve(experiment_uri)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return {}
    out = {}
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, root) if not fs.is_uri(experiment_uri) else info.path[len(root):].lstrip("/")
        rel = rel.replace(os.sep, "/")
        if not sealed_file(rel):
            continue
        digest = hashlib.sha256()
        try:
            with filesystem.open_input_stream(info.path) as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except FileNotFoundError:  # removed meanwhile (Tune keeps only the newest state files)
            continue
        out[rel] = digest.hexdigest()
    return out


def _mac(key: bytes, files: dict[str, list[str]]) -> str:
    body = json.dumps({"version": SEAL_VERSION, "files": files}, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _read_seal(experiment_uri: str, key: bytes) -> dict[str, list[str]] | None:
    """The sealed digests, or None when the store has no seal or one that `key` did not sign."""
    try:
        seal = json.loads(fs.read_bytes(fs.join(experiment_uri, SEAL_FILE)))
        files = seal["files"]
        if seal.get("version") != SEAL_VERSION or not isinstance(files, dict):
            return None
        if not all(isinstance(k, str) and isinstance(v, list) and all(isinstance(d, str) for d in v) for k, v in files.items()):
            return None
        if not hmac.compare_digest(str(seal["mac"]), _mac(key, files)):
            return None
        return files
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def write_seal(experiment_uri: str) -> None:
    """Seal the versions of the sealed files now in the store, keeping those sealed before."""
    key = load_secret(create=True)
    files = _read_seal(experiment_uri, key) or {}
    for rel, digest in _digests(experiment_uri).items():
        versions = [d for d in files.get(rel, []) if d != digest] + [digest]
        files[rel] = versions[-KEEP_VERSIONS:]
    seal = {"version": SEAL_VERSION, "files": files, "mac": _mac(key, files)}
    fs.atomic_write_bytes(fs.join(experiment_uri, SEAL_FILE), (json.dumps(seal, indent=1, sort_keys=True) + "\n").encode())


def verify(experiment_uri: str) -> None:
    """Raise ConfigError unless every sealed file in the store is a version this user's sweep sealed."""
    refuse = f"{experiment_uri}: refusing to resume: "
    key = load_secret(create=False)
    if key is None:
        raise ConfigError(refuse + f"no tune secret at {secret_path()}, so this store was not sealed on this machine by this user (a resume unpickles its state)")
    files = _read_seal(experiment_uri, key)
    if files is None:
        raise ConfigError(refuse + f"{SEAL_FILE} is missing or not signed with this user's tune secret, so the store was written elsewhere or altered (a resume unpickles its state)")
    for rel, digest in sorted(_digests(experiment_uri).items()):
        if digest not in files.get(rel, []):
            raise ConfigError(refuse + f"{rel} is not a version this user's sweep wrote (altered or added since; a resume would unpickle it)")


class SealCallback(Callback):
    """Refreshes the seal while the sweep runs (at most every `period_s`, after Tune's state saves) and at its end."""

    def __init__(self, experiment_uri: str, period_s: float = 2.0):
        self.experiment_uri = experiment_uri
        self.period_s = period_s
        self.last = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last >= self.period_s:
            self.last = time.monotonic()
            write_seal(self.experiment_uri)

    def on_experiment_end(self, trials, **info):
        write_seal(self.experiment_uri)
