"""`metarec recommend RUN_DIR --all-users --out PATH.parquet`: top-k for every target user.

Output: one Parquet file (local or `s3://`), one row per user of the prepared target
domain, in the domain's user order:

    user: string, items: list<string> (original item keys, best first), scores: list<float32>

Each user is scored like `metarec recommend --user` (docs/design.md §5): the model's
full-ranking scores after the last `data.max_len` items of the user's whole sequence,
padding and every item of that sequence excluded, the k best kept (fewer only if the
user has seen all but fewer than k items).

Users are read from the domain's `data.parquet` in chunks (`--batch-size`, default
`train.eval_batch_size`) and each chunk's (B x K) scores are reduced to its top-k
before the next chunk is read, so memory is O(batch × K + K) plus one Parquet row group
of the input (a prepared file holds up to 1Mi users per row group), whatever the number
of users. The file is written to a temporary sibling and moved into place (`fs.atomic_file`).

With Ray (`--ray`, `--ray-address`) the same chunks are scored by Ray Data:
`map_batches` over a pool of `ChunkScorer` actors (one per GPU where the cluster has
GPUs, else one per CPU, or `--workers`), each holding the model once, and written by
Ray Data's Parquet writer into a temporary directory next to the output; the driver
then streams those parts, in chunk order, into the one output file as above and
deletes them. Every chunk is scored by the same `ChunkScorer` code on the same rows
either way, so the two outputs are identical (on the same kind of device). The
chunks go to Ray's object store as one block each (the input sequences, O(interactions),
spilled by Ray when large); the scores never leave their actor as more than top-k.
On a multi-node cluster give `--out` and the run directory as `s3://` (or shared)
locations the workers can reach.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from metarec import fs
from metarec.data.batches import left_pad
from metarec.data.domain import load_item_map, load_manifest
from metarec.data.prepare import DATA_FILE
from metarec.errors import DataError, MetaRecError
from metarec.eval import release_freed_memory
from metarec.objective import last_position_scores
from metarec.run_dir import RunDir

OUTPUT_SCHEMA = pa.schema([("user", pa.string()), ("items", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))])
CHUNK = "chunk"  # chunk index carried through Ray Data, so the parts can be put back in order
_READ_BYTES = 4 << 20


class TargetUsers:
    """The users of a prepared domain, read from its data file chunk by chunk."""

    def __init__(self, root: str, name: str):
        self.manifest = load_manifest(root, name)
        self.data_uri = fs.join(root, name, DATA_FILE)
        self.n_users = int(self.manifest["n_users"])
        self.n_items = int(self.manifest["n_items"])

    def check_sha256(self) -> None:
        """The data file's sha256 against the manifest, streamed (DataError if it differs)."""
        digest = hashlib.sha256()
        with fs.open_input(self.data_uri, decompress=False) as stream:
            while block := stream.read(_READ_BYTES):
                digest.update(block)
        if digest.hexdigest() != self.manifest["sha256"]:
            raise DataError(f"{self.data_uri}: sha256 does not match the domain's manifest (file modified or corrupted); prepare it again")

    def chunks(self, size: int) -> Iterator[pa.Table]:
        """Tables of `size` users (the last one smaller): `user`, `items` (dense IDs, chronological)."""
        self.check_sha256()
        pending: list[pa.Table] = []
        held = seen = 0
        with fs.open_input_file(self.data_uri) as file:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=size, columns=["user", "items"]):
                pending.append(pa.Table.from_batches([batch]))
                held += batch.num_rows
                while held >= size:
                    table = pa.concat_tables(pending)
                    yield self._checked(table.slice(0, size), seen)
                    seen += size
                    pending, held = [table.slice(size)], held - size
        if held:
            yield self._checked(pa.concat_tables(pending), seen)
            seen += held
        if seen != self.n_users:
            raise DataError(f"{self.data_uri}: holds {seen} users, the manifest says n_users={self.n_users}")

    def _checked(self, table: pa.Table, first_row: int) -> pa.Table:
        values = pc.list_flatten(table.column("items"))
        if len(values) and (pc.min(values).as_py() < 1 or pc.max(values).as_py() > self.n_items):
            raise DataError(f"{self.data_uri}: item IDs outside 1..{self.n_items} in users {first_row + 1}..{first_row + table.num_rows}")
        return table.combine_chunks()


def item_keys(root: str, name: str) -> pa.Array:
    """Original item keys indexed by dense ID (index 0, padding, is '')."""
    key_to_id = load_item_map(root, name)
    keys = [""] * (len(key_to_id) + 1)
    for key, i in key_to_id.items():
        keys[i] = key
    return pa.array(keys, pa.string())


class ChunkScorer:
    """Top-k of a chunk of users with RUN_DIR's best checkpoint: a Ray Data actor, and the local loop's scorer.

    `__call__(table)` maps `user`, `items` (dense IDs) to `user`, `items` (keys), `scores`;
    a `chunk` column, if present, is kept and every chunk of the batch is scored on its own.
    """

    def __init__(self, run_dir: str, k: int, device: str = "auto"):
        from metarec.problem import resolve_device
        from metarec.recommend import load_target_model

        cfg = RunDir(run_dir).read_config()
        self.keys = item_keys(cfg.data.root, cfg.data.target)
        self.target, self.max_len, self.k = cfg.data.target, cfg.data.max_len, k
        self.device = resolve_device(device)
        self.model = load_target_model(run_dir, cfg, n_items=len(self.keys) - 1).to(self.device)
        self.params = dict(self.model.named_parameters())

    def __call__(self, batch: pa.Table) -> pa.Table:
        if CHUNK not in batch.column_names:
            return self.top_k(batch)
        chunk = batch.column(CHUNK).to_numpy()
        bounds = np.flatnonzero(np.diff(chunk)) + 1
        parts = []
        for start, stop in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(chunk)]))):
            part = self.top_k(batch.slice(start, stop - start))
            parts.append(part.append_column(CHUNK, pa.array(chunk[start:stop], pa.int64())))
        return pa.concat_tables(parts)

    @torch.no_grad()
    def top_k(self, users: pa.Table) -> pa.Table:
        lists = users.column("items").combine_chunks()
        lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        histories = np.split(flat, np.cumsum(lengths)[:-1])
        inputs = torch.from_numpy(left_pad(histories, self.max_len)).to(self.device)
        scores = last_position_scores(self.model, self.params, self.target, inputs)
        scores[:, 0] = float("-inf")
        rows = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths)).to(self.device)
        scores[rows, torch.from_numpy(flat).to(self.device)] = float("-inf")
        values, ids = torch.topk(scores, min(self.k, scores.shape[1] - 1), dim=1)
        values, ids = values.cpu().numpy(), ids.cpu().numpy()
        keep = np.isfinite(values)
        offsets = pa.array(np.concatenate(([0], np.cumsum(keep.sum(axis=1)))).astype(np.int32))
        del scores
        release_freed_memory()
        return pa.table({
            "user": users.column("user").combine_chunks(),
            "items": pa.ListArray.from_arrays(offsets, self.keys.take(pa.array(ids[keep]))),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(values[keep], pa.float32())),
        })


def recommend_all_users(run_dir: str, out: str, *, k: int = 10, batch_size: int | None = None, progress: bool | None = None,
                        use_ray: bool = False, ray_address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Write the top-k of every target user of RUN_DIR to the Parquet file `out` (module docstring).

    Returns {"out", "target", "users", "k"}.
    """
    if k < 1:
        raise MetaRecError(f"k must be >= 1, got {k}")
    if batch_size is not None and batch_size < 1:
        raise MetaRecError(f"--batch-size must be >= 1, got {batch_size}")
    if workers is not None and workers < 1:
        raise MetaRecError(f"--workers must be >= 1, got {workers}")
    run_dir = run_dir.rstrip("/") or run_dir
    cfg = RunDir(run_dir).read_config()
    if cfg.data.target_users and cfg.data.subsample_items == "compact":
        raise MetaRecError(f"{run_dir}: trained with data.subsample_items=compact (a benchmark protocol); its item IDs are not the domain's, so it cannot recommend")
    if fs.isdir(out):
        raise MetaRecError(f"--out {out}: is a directory; give the Parquet file to write, e.g. {fs.join(out, 'recommendations.parquet')}")
    users = TargetUsers(cfg.data.root, cfg.data.target)
    size = batch_size or cfg.train.eval_batch_size
    if use_ray or ray_address:
        _score_with_ray_data(run_dir, out, users, size, k, ray_address, workers)
    else:
        _score_locally(run_dir, out, users, size, k, progress)
    return {"out": out, "target": cfg.data.target, "users": users.n_users, "k": k}


def _score_locally(run_dir: str, out: str, users: TargetUsers, size: int, k: int, progress: bool | None) -> None:
    scorer = ChunkScorer(run_dir, k)
    show = sys.stderr.isatty() if progress is None else progress
    with fs.atomic_file(out) as tmp:
        with fs.open_output(tmp) as stream, pq.ParquetWriter(stream, OUTPUT_SCHEMA) as writer, tqdm(
            total=users.n_users, unit="user", desc="recommend", disable=not show
        ) as bar:
            for chunk in users.chunks(size):
                writer.write_table(scorer(chunk))
                bar.update(chunk.num_rows)


def _score_with_ray_data(run_dir: str, out: str, users: TargetUsers, size: int, k: int, address: str | None, workers: int | None) -> None:
    import ray

    from metarec.ray.session import connect

    connect(address)
    import ray.data

    refs = []
    for index, chunk in enumerate(users.chunks(size)):
        refs.append(ray.put(chunk.append_column(CHUNK, pa.array(np.full(chunk.num_rows, index, np.int64)))))
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    pool = min(workers or gpus or max(1, int(resources.get("CPU", 1))), len(refs))
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    scored = ray.data.from_arrow_refs(refs).map_batches(
        ChunkScorer, fn_constructor_kwargs={"run_dir": run_dir, "k": k}, batch_size=None, batch_format="pyarrow",
        concurrency=pool, num_cpus=1, num_gpus=1 if gpus else 0,
    )
    parts = fs.temp_sibling(out, "parts")
    try:
        filesystem, path = fs.resolve(parts)
        scored.write_parquet(path, filesystem=filesystem)
        merge_parts(parts, out, n_users=users.n_users)
    finally:
        fs.remove(parts)


def merge_parts(parts: str, out: str, *, n_users: int) -> None:
    """Stream Ray Data's Parquet parts (rows tagged with their chunk index) into the one file
    `out`, in chunk order, without the chunk column; O(row group) memory."""
    files = []
    for name in fs.listdir(parts):
        if name.endswith(".parquet"):
            with fs.open_input_file(fs.join(parts, name)) as file:
                part = pq.ParquetFile(file)
                groups = [g for g in range(part.num_row_groups) if part.metadata.row_group(g).num_rows]
                if groups:
                    files.append((part.read_row_group(groups[0], columns=[CHUNK]).column(CHUNK)[0].as_py(), name))
    last, written = -1, 0
    with fs.atomic_file(out) as tmp:
        with fs.open_output(tmp) as stream, pq.ParquetWriter(stream, OUTPUT_SCHEMA) as writer:
            for _first, name in sorted(files):
                with fs.open_input_file(fs.join(parts, name)) as file:
                    part = pq.ParquetFile(file)
                    for group in range(part.num_row_groups):
                        table = part.read_row_group(group)
                        chunk = table.column(CHUNK).to_numpy()
                        if chunk.size and (chunk[0] < last or np.any(np.diff(chunk) < 0)):
                            raise MetaRecError(f"{parts}: Ray Data wrote the chunks out of order ({name}); nothing was written to {out}")
                        last = int(chunk[-1]) if chunk.size else last
                        writer.write_table(table.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA))
                        written += table.num_rows
            if written != n_users:
                raise MetaRecError(f"{parts}: Ray Data wrote {written} rows for {n_users} users; nothing was written to {out}")
