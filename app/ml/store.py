"""The single reader/writer of model_store/: a versioned, self-describing directory of safetensors + JSON + FAISS.

Format 2 (written by this code; format 1 stores still load, and `migrate_store` converts them):

    <store>/
      manifest.json                       the current version: everything needed to interpret the files below.
                                          Replaced atomically (os.replace), so it is also the version pointer.
      segments/<sha12>.safetensors        expert statistics, append-only: mu [n, D], var [n, D] (float16|float32)
      embeddings-<sha12>.safetensors      embeddings [E, e] float32, L2-normalised, library row order
      index-<sha12>.faiss                 FAISS index over the embeddings (faiss' own binary format, no pickle)
      artifacts/<name>-<sha12>.safetensors  named extras (router, transfer matrix, ...): `write_artifact`
      cvae.safetensors                    CVAE weights + normaliser statistics (optional until train-cvae has run)
      base_weights.safetensors            optional: a local base model file the store was built on (the tiny demo)

Every file but manifest.json is immutable once written: files that change between versions carry their content
hash in their name, so a process still serving the previous version keeps reading consistent bytes while an
update (`update_store`: add/remove experts; `write_artifact`) writes the next one beside it and swaps the
manifest. A full build (`write_store`) is written into a temporary sibling directory and renamed into place.

Integrity without hashing gigabytes at start-up: every small file is re-hashed at open; a segment's size and
safetensors header are checked at open (truncation), and each expert row is checked against its digest in the
manifest the first time it is read (edits). Row digests are xxh3-128 (`library.row_digest`; stores written before
it was recorded use blake2b-128 and keep it through updates): a request's first read of its K rows hashes them at
memory speed, so a library too large for its rows to have been read already costs no more per request than a
small one (blake2b took ~1.3 ms per ViT-B/16 expert, most of an aggregation). `verify_store` re-hashes everything.
A mismatch raises `StoreError`
naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from app.ml.aggregator import ExpertBank
from app.ml.backbone import file_sha256
from app.ml.cvae import CVAE, CVAEConfig, TensorNormalizer
from app.ml.lora import LayoutMismatchError, LoRAConfig, LoRALayout, check_layout
from app.ml.routing import StoreRouting
from app.ml.routing_index import fit_index

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
BASE_WEIGHTS_FILE = "base_weights.safetensors"
CVAE_FILE = "cvae.safetensors"
MANIFEST = "manifest.json"
SEGMENTS_DIR = "segments"
ARTIFACTS_DIR = "artifacts"
DTYPES = {"float32": (torch.float32, np.float32, "F32"), "float16": (torch.float16, np.float16, "F16")}
ROW_DIGEST = "xxh3-128"  # what new stores record; "blake2b-128" is what a store without `library.row_digest` used
SEGMENT_ROWS = 512  # rows per segment a full build writes: bounds the memory of one write, many files are fine


class StoreError(ValueError):
    """A store that is missing, corrupt, or built for another model/layout."""


@dataclass
class TrainedCVAE:
    model: CVAE
    normalizer: TensorNormalizer
    info: dict  # training provenance (steps, final loss, conditioning), recorded in the manifest


@dataclass
class Artifact:
    """A named extra a store carries (a learned router, transfer measurements, validation results).

    `depends_on_library`: made from the current experts, so add/remove-experts marks it stale."""

    tensors: dict[str, torch.Tensor]
    record: dict = field(default_factory=dict)  # free JSON, kept in the manifest
    depends_on_library: bool = True


@dataclass
class Store:
    path: Path
    manifest: dict
    layout: LoRALayout
    lora_config: LoRAConfig
    bank: ExpertBank
    cvae: TrainedCVAE | None
    routing: StoreRouting | None = None  # validated defaults, gate, transfer router (None: unvalidated or stale)

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    @property
    def dtype(self) -> str:
        """On-disk dtype of the expert statistics (aggregation is always float32 or wider)."""
        return self.manifest.get("library", {}).get("dtype", "float32")

    def base_pretrained(self) -> str | None:
        """What to pass to `load_backbone`: a tag, an absolute path to the bundled file, or None."""
        pretrained = self.base_model.get("pretrained")
        if pretrained == BASE_WEIGHTS_FILE:
            return str(self.path / BASE_WEIGHTS_FILE)
        return pretrained

    def artifact(self, name: str, allow_stale: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, record) of a named artifact. A stale one (the library changed since it was made) raises
        StoreError unless `allow_stale`: serving it silently would apply numbers measured on other experts."""
        record = self.manifest.get("artifacts", {}).get(name)
        if record is None:
            raise StoreError(f"{self.path}: no artifact {name!r} (have {sorted(self.manifest.get('artifacts', {}))})")
        if record.get("stale") and not allow_stale:
            raise StoreError(f"{self.path}: artifact {name!r} is stale: {record.get('stale_reason')}")
        return load_file(str(self.path / record["file"])), record


# ============================================================================================ the library rows


class MappedLibrary:
    """Expert statistics [E, D] spread over memory-mapped segment files; only the rows asked for are read.

    Row r of the library is row `rows[r]` of segment `seg[r]`. A row is checked against its manifest digest the
    first time it is read; a mismatch names the segment file. After copying rows out, their pages are dropped
    from this process's mapping (MADV_DONTNEED): the OS page cache still holds hot rows, but the resident set
    stays at what requests use now instead of growing to every row ever routed to.
    """

    def __init__(self, store_path: Path, segments: list[dict], experts: list[dict], D: int,
                 digest: str = "blake2b-128"):
        self.path, self.D, self.digest = Path(store_path), D, digest
        self._files = [s["file"] for s in segments]
        index_of = {s["file"]: i for i, s in enumerate(segments)}
        self._maps: list[tuple[mmap.mmap, np.ndarray, np.ndarray]] = [self._open(s, D) for s in segments]
        self.seg = np.array([index_of[e["segment"]] for e in experts], dtype=np.int64)
        self.row = np.array([e["row"] for e in experts], dtype=np.int64)
        self.digests = [e["digest"] for e in experts]
        self.ids = [e["id"] for e in experts]
        self._verified = np.zeros(len(experts), dtype=bool)
        self._lock = threading.Lock()  # verification bookkeeping only; reads are lock-free

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.seg), self.D)

    def _open(self, record: dict, D: int) -> tuple[mmap.mmap, np.ndarray, np.ndarray]:
        file = self.path / record["file"]
        if not file.is_file():
            raise StoreError(f"{self.path}: segment {record['file']} is missing")
        size = file.stat().st_size
        if size != record["bytes"]:
            raise StoreError(f"{self.path}: segment {record['file']} is truncated or was rewritten "
                             f"({size} bytes, manifest says {record['bytes']})")
        with open(file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        arrays = _segment_views(mm, record, D)
        if arrays is None:
            mm.close()
            raise StoreError(f"{self.path}: segment {record['file']} has a header that does not match the manifest "
                             f"({record['rows']} rows of D={D} {record['dtype']})")
        return (mm, *arrays)

    def gather(self, rows: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [K, D], var [K, D]) float32 for library rows `rows` (any order, repeats allowed)."""
        rows = [int(r) for r in rows]
        dtypes = {self._maps[self.seg[r]][1].dtype for r in rows}
        raw_dtype = dtypes.pop() if len(dtypes) == 1 else np.float32  # one store has one dtype; be safe anyway
        mu_kd = np.empty((len(rows), self.D), dtype=raw_dtype)  # on-disk dtype: copying rows is a memcpy
        var_kd = np.empty((len(rows), self.D), dtype=raw_dtype)
        for r in rows:  # every row's read in flight at once: a library larger than the page cache pays ~one read
            mm, mu_nd, var_nd = self._maps[self.seg[r]]
            self._advise(mm, mu_nd, self.row[r], mmap.MADV_WILLNEED)
            self._advise(mm, var_nd, self.row[r], mmap.MADV_WILLNEED)
        for i, r in enumerate(rows):
            mm, mu_nd, var_nd = self._maps[self.seg[r]]
            j = self.row[r]
            mu_kd[i], var_kd[i] = mu_nd[j], var_nd[j]
            self._advise(mm, mu_nd, j, mmap.MADV_DONTNEED)
            self._advise(mm, var_nd, j, mmap.MADV_DONTNEED)
            if not self._verified[r]:
                self._verify(r, mu_kd[i], var_kd[i])
        # torch's vectorised half -> float conversion (numpy's is a scalar loop, ~10x slower on a 110k row)
        return torch.from_numpy(mu_kd).float(), torch.from_numpy(var_kd).float()

    def _verify(self, r: int, mu_d: np.ndarray, var_d: np.ndarray) -> None:
        if row_digest(mu_d, var_d, self.digest) != self.digests[r]:
            raise StoreError(f"{self.path}: segment {self._files[self.seg[r]]} is corrupt or was edited: row "
                             f"{self.row[r]} (expert {self.ids[r]!r}) does not match its digest in the manifest")
        with self._lock:
            self._verified[r] = True

    @staticmethod
    def _advise(mm: mmap.mmap, array_nd: np.ndarray, j: int, advice: int) -> None:
        """madvise the pages of row j: WILLNEED starts reading them, DONTNEED drops them from this mapping."""
        start = array_nd.ctypes.data - _address_of(mm) + int(j) * array_nd.strides[0]
        begin = start - start % mmap.PAGESIZE
        end = start + array_nd.strides[0]
        with contextlib.suppress(OSError, ValueError):  # advice only: a kernel that refuses it costs time, not data
            mm.madvise(advice, begin, end - begin)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole library as float32 tensors (offline jobs that need every row), every row verified."""
        mus, variances = [], []
        for start in range(0, len(self.seg), SEGMENT_ROWS):
            mu_kd, var_kd = self.gather(range(start, min(start + SEGMENT_ROWS, len(self.seg))))
            mus.append(mu_kd)
            variances.append(var_kd)
        return torch.cat(mus), torch.cat(variances)

    def verify_all(self) -> None:
        self.dense()


def _address_of(mm: mmap.mmap) -> int:
    return np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data


def _segment_views(mm: mmap.mmap, record: dict, D: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero-copy (mu [n, D], var [n, D]) views into a safetensors segment, or None if its header disagrees.

    Parsed by hand rather than with safe_open because we keep the mapping for the life of the process and index
    single rows of it; the file itself is written by safetensors and stays a valid safetensors file.
    """
    try:
        (n,) = struct.unpack("<Q", mm[:8])
        header = json.loads(mm[8 : 8 + n])
    except (struct.error, ValueError):
        return None
    _, np_dtype, st_dtype = DTYPES[record["dtype"]]
    rows, itemsize = record["rows"], np.dtype(np_dtype).itemsize
    views = []
    for name in ("mu", "var"):
        info = header.get(name)
        if not isinstance(info, dict) or info.get("dtype") != st_dtype or info.get("shape") != [rows, D]:
            return None
        begin, end = info["data_offsets"]
        if end - begin != rows * D * itemsize or 8 + n + end > len(mm):
            return None
        views.append(np.frombuffer(mm, dtype=np_dtype, count=rows * D, offset=8 + n + begin).reshape(rows, D))
    return views[0], views[1]


class MappedRows:
    """`bank.mu` / `bank.var` of a memory-mapped store: indexable like a tensor ([rows] -> float32 [K, D])."""

    def __init__(self, library: MappedLibrary, which: int):
        self.library, self.which = library, which  # which: 0 = mu, 1 = var
        self.shape, self.ndim = torch.Size(library.shape), 2
        self.dtype, self.device = torch.float32, torch.device("cpu")  # what __getitem__ returns

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> torch.Tensor:
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.shape[0]))
        elif isinstance(rows, (int, np.integer)):
            return self.library.gather([int(rows)])[self.which][0]
        elif isinstance(rows, torch.Tensor):
            rows = rows.reshape(-1).tolist()
        return self.library.gather(list(rows))[self.which]


def row_digest(mu_d: np.ndarray, var_d: np.ndarray, algorithm: str = ROW_DIGEST) -> str:
    """Digest of one expert's on-disk bytes (mu row then var row): checked the first time the row is read."""
    if algorithm not in _ROW_HASHES:
        raise StoreError(f"unknown row digest {algorithm!r} (this code knows {sorted(_ROW_HASHES)})")
    h = _ROW_HASHES[algorithm]()
    h.update(np.ascontiguousarray(mu_d).data)
    h.update(np.ascontiguousarray(var_d).data)
    return h.hexdigest()


# ============================================================================================ writing


def _content_name(data_or_file: bytes | Path) -> str:
    if isinstance(data_or_file, bytes):
        return hashlib.sha256(data_or_file).hexdigest()
    return file_sha256(data_or_file)


def _write_new(directory: Path, name: str, data: bytes) -> None:
    """Write bytes under a name that must not exist yet (content-addressed names never change content)."""
    target = directory / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return  # same name => same content: an identical file from an earlier version is reused
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.rename(target)


_ROW_HASHES = {"xxh3-128": xxhash.xxh3_128, "blake2b-128": lambda: hashlib.blake2b(digest_size=16)}


def row_digest_of(manifest: dict) -> str:
    """The row digest a format-2 store uses (blake2b-128 for those written before it was recorded)."""
    return manifest["library"].get("row_digest", "blake2b-128")


def write_segment(directory: Path, mu_nd: torch.Tensor, var_nd: torch.Tensor, dtype: str,
                  digest: str = ROW_DIGEST) -> tuple[dict, list[str]]:
    """One immutable segment file for rows mu/var [n, D]; returns (its manifest record, per-row digests)."""
    if dtype not in DTYPES:
        raise StoreError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if mu_nd.ndim != 2 or mu_nd.shape != var_nd.shape:
        raise StoreError(f"mu and var must both be [n, D]; got {list(mu_nd.shape)} and {list(var_nd.shape)}")
    torch_dtype = DTYPES[dtype][0]
    mu_nd = mu_nd.detach().cpu().to(torch_dtype).contiguous()
    var_nd = var_nd.detach().cpu().to(torch_dtype).contiguous()
    if not (torch.isfinite(mu_nd).all() and torch.isfinite(var_nd).all()):
        raise StoreError(f"expert statistics are not finite in {dtype} (too large for it?)")
    if (var_nd < 0).any():
        raise StoreError("expert variances must be >= 0")
    data = save({"mu": mu_nd, "var": var_nd})
    sha = _content_name(data)
    name = f"{SEGMENTS_DIR}/{sha[:16]}.safetensors"
    _write_new(directory, name, data)
    mu_np, var_np = mu_nd.numpy(), var_nd.numpy()
    digests = [row_digest(mu_np[i], var_np[i], digest) for i in range(len(mu_np))]
    return {"file": name, "rows": int(mu_nd.shape[0]), "dtype": dtype, "bytes": len(data), "sha256": sha}, digests


def _write_embeddings_and_index(directory: Path, embeddings: np.ndarray, index_policy: str | dict) -> dict:
    """Embeddings file + index file (content-named); returns the manifest's `index` record."""
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    data = save({"embeddings": torch.from_numpy(embeddings)})
    emb_name = f"embeddings-{_content_name(data)[:16]}.safetensors"
    _write_new(directory, emb_name, data)
    index, spec, recall = fit_index(embeddings, index_policy)
    index_bytes = faiss.serialize_index(index).tobytes()
    index_name = f"index-{_content_name(index_bytes)[:16]}.faiss"
    _write_new(directory, index_name, index_bytes)
    return {"factory": spec.factory, "search": spec.search, "policy": index_policy, "dim": int(embeddings.shape[1]),
            "metric": "inner_product", "file": index_name, "embeddings_file": emb_name,
            "recall_at_4": recall}


def _files_record(directory: Path, names: Sequence[str]) -> tuple[dict, dict]:
    files, sizes = {}, {}
    for name in sorted(names):
        files[name] = file_sha256(directory / name)
        sizes[name] = (directory / name).stat().st_size
    return files, sizes


def library_id(experts: Sequence[dict]) -> str:
    """Identity of the library's content (which experts, which bytes): artifacts record the one they were made on."""
    spec = [[e["id"], e["digest"]] for e in experts]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _finish_manifest(manifest: dict) -> dict:
    manifest["library"]["library_id"] = library_id(manifest["experts"])
    content = {k: manifest.get(k) for k in ("files", "library", "experts", "index", "artifacts", "cvae")}
    manifest["version"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    manifest["created_unix"] = int(time.time())
    return manifest


def write_store(
    path: Path,
    *,
    base_model: dict,
    lora_config: LoRAConfig,
    layout: LoRALayout,
    bank: ExpertBank,
    experts: list[dict],
    index_factory: str,
    cvae: TrainedCVAE | None = None,
    base_weights_file: Path | None = None,
    dtype: str = "float32",
    artifacts: dict[str, Artifact] | None = None,
    build: dict | None = None,
) -> str:
    """Write a complete store atomically (temp dir + rename); returns its version (a content hash).

    `build`: what the store was built with (threads, library versions): recorded, not part of the version.

    `index_factory` is a faiss factory string, or "auto" (exact up to a size threshold, IVF above; see
    `choose_index`). `artifacts`: named extras (`Store.artifact(name)` reads them back).
    """
    if list(bank.ids) != [e["id"] for e in experts]:
        raise StoreError("expert records and library rows are not in the same order")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        segments, records = [], []
        for start in range(0, len(bank), SEGMENT_ROWS):
            rows = range(start, min(start + SEGMENT_ROWS, len(bank)))
            mu_nd, var_nd = bank.gather(rows)
            segment, digests = write_segment(tmp, mu_nd, var_nd, dtype)
            segments.append(segment)
            records += [{**experts[r], "segment": segment["file"], "row": i, "digest": d}
                        for i, (r, d) in enumerate(zip(rows, digests, strict=True))]
        index_record = _write_embeddings_and_index(tmp, bank.embeddings, index_factory)
        cvae_record = None
        if cvae is not None:
            tensors = {f"model.{k}": v.contiguous() for k, v in cvae.model.state_dict().items()}
            tensors |= cvae.normalizer.to_tensors()  # keys "normalizer.*"
            save_file(tensors, str(tmp / CVAE_FILE))
            cvae_record = {"config": cvae.model.config.to_dict(), "info": cvae.info}
        if base_weights_file is not None:
            shutil.copyfile(base_weights_file, tmp / BASE_WEIGHTS_FILE)
        records_lib = library_id(records)
        artifact_records = {name: _put_artifact(tmp, name, a, records_lib) for name, a in (artifacts or {}).items()}
        small = [index_record["file"], index_record["embeddings_file"]]
        small += [n for n in (CVAE_FILE, BASE_WEIGHTS_FILE) if (tmp / n).exists()]
        small += [a["file"] for a in artifact_records.values()]
        files, sizes = _files_record(tmp, small)
        manifest = _finish_manifest({
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "lora": lora_config.to_dict(),
            "layout": layout.to_manifest(),
            "library": {"dtype": dtype, "segments": segments, "row_digest": ROW_DIGEST},
            "experts": records,
            "index": index_record,
            "cvae": cvae_record,
            "artifacts": artifact_records,
            "files": files,
            "sizes": sizes,
            "parent_version": None,
            "build": build,
        })
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest["version"]


def _replace_dir(new: Path, target: Path) -> None:
    # rename() cannot replace a non-empty directory, so move the old store aside first; a reader sees either
    # the old store or the new one at `target`, except for the instant between the two renames.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ============================================================================================ updating


@dataclass
class NewExperts:
    """Rows to append: records (id, description, provenance), mu/var [n, D], embeddings [n, e]."""

    records: list[dict]
    mu: torch.Tensor
    var: torch.Tensor
    embeddings: np.ndarray


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    # flock on the directory itself: one writer at a time, and no lock file that would change the directory.
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _swap_manifest(path: Path, manifest: dict) -> None:
    """Atomically make `manifest` the current version (write + fsync + rename over manifest.json)."""
    tmp = path / f".{MANIFEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST)


def _referenced(manifest: dict) -> set[str]:
    names = set(manifest.get("files", {}))
    names |= {s["file"] for s in manifest.get("library", {}).get("segments", [])}
    return names | {MANIFEST}


def _collect_garbage(path: Path, keep: set[str]) -> None:
    """Remove files neither the new nor the previous version names. The previous version's files stay, so a
    process that read the previous manifest a moment ago can still finish loading it."""
    for file in path.rglob("*"):
        rel = file.relative_to(path).as_posix()
        if file.is_file() and rel not in keep and not file.name.startswith("."):
            file.unlink()


def _check_new(current: dict, new: NewExperts, D: int) -> None:
    have = {e["id"] for e in current["experts"]}
    ids = [r["id"] for r in new.records]
    duplicates = sorted({i for i in ids if i in have} | {i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise StoreError(f"expert ids already in the library (or given twice): {duplicates}")
    if tuple(new.mu.shape) != (len(ids), D) or new.var.shape != new.mu.shape:
        raise StoreError(f"new experts: expected mu/var of shape [{len(ids)}, {D}], got {list(new.mu.shape)} "
                         f"and {list(new.var.shape)}")
    width = current["index"]["dim"]
    if new.embeddings.shape != (len(ids), width):
        raise StoreError(f"new experts: expected embeddings [{len(ids)}, {width}], got {list(new.embeddings.shape)}")


def update_store(path: Path, add: NewExperts | None = None, remove: Sequence[str] = (), reason: str = "") -> str:
    """Append and/or remove experts, writing a new version beside the current one and swapping the manifest.

    Nothing in the directory changes unless the whole update succeeds. Library-dependent artifacts are marked
    stale (with the reason) rather than served for a library they were not made on. Returns the new version.
    """
    path = Path(path)
    with _writer_lock(path):
        current = read_manifest(path)
        if current["format_version"] != FORMAT_VERSION:
            raise StoreError(f"{path}: store format {current['format_version']}; run "
                             f"`python -m offline migrate-store --store {path}` first")
        D = current["layout"]["D"]
        unknown = sorted(set(remove) - {e["id"] for e in current["experts"]})
        if unknown:
            raise StoreError(f"cannot remove experts that are not in the library: {unknown}")
        if add is not None:
            _check_new(current, add, D)
        kept = [e for e in current["experts"] if e["id"] not in set(remove)]
        if not kept and (add is None or not add.records):
            raise StoreError("an update may not leave the library empty")
        before = {p.relative_to(path).as_posix() for p in path.rglob("*")}
        try:
            manifest = _next_manifest(path, current, kept, add, remove, reason)
        except BaseException:
            for file in path.rglob("*"):  # leave the directory exactly as it was
                if file.relative_to(path).as_posix() not in before and file.is_file():
                    file.unlink()
            for d in sorted(path.rglob("*"), reverse=True):
                if d.is_dir() and d.relative_to(path).as_posix() not in before:
                    d.rmdir()
            raise
        _swap_manifest(path, manifest)
        _collect_garbage(path, _referenced(manifest) | _referenced(current))
    return manifest["version"]


_KNOWN_SECTIONS = {"format_version", "version", "parent_version", "change", "created_unix", "base_model", "lora",
                   "layout", "library", "experts", "index", "artifacts", "cvae", "files", "sizes", "build"}


def _next_manifest(path: Path, current: dict, kept: list[dict], add: NewExperts | None, remove: Sequence[str],
                   reason: str) -> dict:
    """Write the new version's files beside the current ones; returns its manifest (not yet current)."""
    old_embeddings = load_file(str(path / current["index"]["embeddings_file"]))["embeddings"].numpy()
    row_of = {e["id"]: i for i, e in enumerate(current["experts"])}
    embeddings = old_embeddings[[row_of[e["id"]] for e in kept]]
    records, segments = list(kept), list(current["library"]["segments"])
    dtype = current["library"]["dtype"]
    if add is not None and add.records:
        segment, digests = write_segment(path, add.mu, add.var, dtype, row_digest_of(current))
        segments.append(segment)
        records += [{**r, "segment": segment["file"], "row": i, "digest": d}
                    for i, (r, d) in enumerate(zip(add.records, digests, strict=True))]
        embeddings = np.concatenate([embeddings, np.asarray(add.embeddings, dtype=np.float32)])
    live = {e["segment"] for e in records}
    segments = [s for s in segments if s["file"] in live]
    policy = current["index"].get("policy", current["index"]["factory"])
    index_record = _write_embeddings_and_index(path, embeddings, policy)
    added = [r["id"] for r in add.records] if add is not None else []
    change = reason or f"experts added {added}, removed {sorted(remove)}"
    stale = {"stale": True, "stale_reason": f"library changed after it was made: {change}"}
    artifacts = {}
    for name, record in current.get("artifacts", {}).items():
        if record.get("depends_on_library", True) and not record.get("stale"):
            record = record | stale
        artifacts[name] = record
    # Manifest sections this module does not know (e.g. the method's validated routing) were made on the old
    # library too: they are marked stale rather than silently served for a library they were not made on.
    unknown = {k: (v | stale if isinstance(v, dict) and not v.get("stale") else v)
               for k, v in current.items() if k not in _KNOWN_SECTIONS}
    small = [index_record["file"], index_record["embeddings_file"]]
    small += [n for n in current["files"] if n.startswith(ARTIFACTS_DIR + "/") or n in (CVAE_FILE, BASE_WEIGHTS_FILE)]
    files, sizes = _files_record(path, small)
    return _finish_manifest(current | unknown | {
        "library": {"dtype": dtype, "segments": segments, "row_digest": row_digest_of(current)},
        "experts": records,
        "index": index_record,
        "artifacts": artifacts,
        "files": files,
        "sizes": sizes,
        "parent_version": current["version"],
        "change": change,
    })


def _put_artifact(directory: Path, name: str, artifact: Artifact, lib_id: str) -> dict:
    """Write an artifact's tensors (content-named) and return its manifest record."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise StoreError(f"artifact name must be letters, digits, '-' or '_', got {name!r}")
    data = save({k: v.contiguous() for k, v in artifact.tensors.items()})
    file = f"{ARTIFACTS_DIR}/{name}-{_content_name(data)[:16]}.safetensors"
    _write_new(directory, file, data)
    return {"file": file, "depends_on_library": artifact.depends_on_library, "library_id": lib_id, "stale": False,
            "stale_reason": None, "record": artifact.record}


def write_artifact(path: Path, name: str, tensors: dict[str, torch.Tensor], record: dict | None = None,
                   depends_on_library: bool = True) -> str:
    """Add or replace a named artifact (safetensors + a manifest record) as a new store version.

    `depends_on_library`: made from the current experts (a router, transfer measurements, validation), so
    add/remove-experts marks it stale. Returns the new version.
    """
    path = Path(path)
    with _writer_lock(path):
        current = read_manifest(path)
        if current["format_version"] != FORMAT_VERSION:
            raise StoreError(f"{path}: format {current['format_version']}: migrate the store first")
        entry = _put_artifact(path, name, Artifact(tensors, record or {}, depends_on_library),
                              current["library"]["library_id"])
        artifacts = dict(current.get("artifacts", {})) | {name: entry}
        old_file = current.get("artifacts", {}).get(name, {}).get("file")
        files = {k: v for k, v in current["files"].items() if k != old_file}
        sizes = {k: v for k, v in current.get("sizes", {}).items() if k != old_file}
        f_new, s_new = _files_record(path, [entry["file"]])
        manifest = _finish_manifest(current | {"artifacts": artifacts, "files": files | f_new, "sizes": sizes | s_new,
                                               "parent_version": current["version"], "change": f"artifact {name}"})
        _swap_manifest(path, manifest)
        _collect_garbage(path, _referenced(manifest) | _referenced(current))
    return manifest["version"]


# ============================================================================================ reading


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"no model store at {path}: {manifest_path.name} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{manifest_path} is not valid JSON: {e}") from e
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise StoreError(f"{path}: store format {manifest.get('format_version')}, this code reads {READABLE_FORMATS}")
    return manifest


def current_version(path: Path) -> str:
    """The version the store's pointer (manifest.json) names now: cheap, for watchers."""
    return read_manifest(path)["version"]


def verify_files(path: Path, manifest: dict) -> None:
    """Every small file the manifest lists exists and hashes to what was written: catches truncation and edits."""
    for name, digest in manifest["files"].items():
        file = Path(path) / name
        if not file.is_file():
            raise StoreError(f"{path}: {name} is missing")
        size = manifest.get("sizes", {}).get(name)
        if size is not None and file.stat().st_size != size:
            raise StoreError(f"{path}: {name} is truncated or was edited ({file.stat().st_size} bytes, "
                             f"manifest says {size})")
        actual = file_sha256(file)
        if actual != digest:
            raise StoreError(f"{path}: {name} is corrupt or was edited (sha256 {actual[:12]}, manifest {digest[:12]})")


def verify_store(path: Path) -> dict:
    """Full check: every file re-hashed, every segment's sha256 and every expert row's digest. Returns counts."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    if manifest["format_version"] == 1:
        return {"files": len(manifest["files"]), "segments": 0, "rows": len(manifest["experts"])}
    for s in manifest["library"]["segments"]:
        file = path / s["file"]
        if not file.is_file() or file_sha256(file) != s["sha256"]:
            raise StoreError(f"{path}: segment {s['file']} is missing, corrupt or was edited")
    library = MappedLibrary(path, manifest["library"]["segments"], manifest["experts"], manifest["layout"]["D"],
                            row_digest_of(manifest))
    library.verify_all()
    return {"files": len(manifest["files"]), "segments": len(manifest["library"]["segments"]),
            "rows": len(manifest["experts"])}


def load_store(path: Path, expected_layout: LoRALayout | None = None, expected_weights_id: str | None = None,
               mmap_library: bool = False) -> Store:
    """Load and verify a store. `expected_*` describe the model it will serve; a mismatch raises StoreError.

    `mmap_library=True` (the service) keeps the expert statistics memory-mapped and reads only routed rows;
    the default loads them as float32 tensors (offline jobs read every row anyway).
    """
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        layout = LoRALayout.from_manifest(manifest["layout"])
        if expected_layout is not None:
            check_layout(expected_layout, layout)
    except LayoutMismatchError as e:
        raise StoreError(f"{path}: {e}") from e
    if expected_weights_id is not None and manifest["base_model"]["weights_id"] != expected_weights_id:
        raise StoreError(f"{path}: built on base weights {manifest['base_model']['weights_id']}, "
                         f"but the model loaded has {expected_weights_id}")
    if manifest["format_version"] == 1:
        bank = _load_bank_v1(path, manifest, layout)
    else:
        bank = _load_bank_v2(path, manifest, layout, mmap_library)
    store = Store(path, manifest, layout, LoRAConfig.from_dict(manifest["lora"]), bank, _load_cvae(path, manifest))
    store.routing = _load_routing(store)
    return store


ROUTING_ARTIFACT = "routing"  # offline validation: router + transfer matrix tensors, the choices as the record


def routing_artifact(routing: StoreRouting, transfer_tensors: dict[str, np.ndarray]) -> Artifact:
    """The validated routing as a store artifact: marked stale (and then not served) when the library changes."""
    router = {} if routing.router is None else routing.router.to_tensors()
    domain = {} if routing.domain is None else routing.domain.to_tensors()
    arrays = ({f"router.{k}": v for k, v in router.items()} | {f"transfer.{k}": v for k, v in transfer_tensors.items()}
              | {f"domain.{k}": v for k, v in domain.items()})
    return Artifact({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, routing.to_manifest())


def routing_record(manifest: dict) -> dict | None:
    """The validated routing choices recorded in a manifest (None: unvalidated); `stale` says if still served."""
    entry = manifest.get("artifacts", {}).get(ROUTING_ARTIFACT)
    return None if entry is None else entry["record"] | {"stale": bool(entry.get("stale")),
                                                          "stale_reason": entry.get("stale_reason")}


def _load_routing(store: Store) -> StoreRouting | None:
    entry = store.manifest.get("artifacts", {}).get(ROUTING_ARTIFACT)
    if entry is None or entry.get("stale"):  # stale: measured on another library; serve as unvalidated
        return None
    tensors, record = store.artifact(ROUTING_ARTIFACT)
    router = {k.removeprefix("router."): v.numpy() for k, v in tensors.items() if k.startswith("router.")}
    domain = {k.removeprefix("domain."): v.numpy() for k, v in tensors.items() if k.startswith("domain.")}
    return StoreRouting.from_manifest(record["record"], router or None, domain or None)


def routing_tensors(store: Store) -> dict[str, np.ndarray]:
    """The transfer matrix the store was validated with ({} when none or stale): "gains", "mask", "zero_shot"."""
    if store.routing is None:
        return {}
    tensors, _ = store.artifact(ROUTING_ARTIFACT)
    return {k.removeprefix("transfer."): v.numpy() for k, v in tensors.items() if k.startswith("transfer.")}


def _load_bank_v1(path: Path, manifest: dict, layout: LoRALayout) -> ExpertBank:
    try:
        library = load_file(str(path / "library.safetensors"))
        index = faiss.read_index(str(path / "index.faiss"))
    except (SafetensorError, RuntimeError) as e:
        raise StoreError(f"{path}: cannot read library: {e}") from e
    if library["mu"].shape[1] != layout.D:
        raise StoreError(f"{path}: library vectors have D={library['mu'].shape[1]}, layout says {layout.D}")
    experts = manifest["experts"]
    return ExpertBank(ids=[e["id"] for e in experts], descriptions=[e["description"] for e in experts],
                      mu=library["mu"], var=library["var"], embeddings=library["embeddings"].numpy(), index=index)


def _load_bank_v2(path: Path, manifest: dict, layout: LoRALayout, mmap_library: bool) -> ExpertBank:
    record, experts = manifest["index"], manifest["experts"]
    try:
        embeddings = load_file(str(path / record["embeddings_file"]))["embeddings"].numpy()
        index = faiss.read_index(str(path / record["file"]))
    except (SafetensorError, RuntimeError, KeyError) as e:
        raise StoreError(f"{path}: cannot read the routing index: {e}") from e
    if record.get("search"):
        faiss.ParameterSpace().set_index_parameters(index, record["search"])
    library = MappedLibrary(path, manifest["library"]["segments"], experts, layout.D, row_digest_of(manifest))
    if mmap_library:
        mu, var = MappedRows(library, 0), MappedRows(library, 1)
    else:
        mu, var = library.dense()
    return ExpertBank(ids=[e["id"] for e in experts], descriptions=[e["description"] for e in experts],
                      mu=mu, var=var, embeddings=embeddings, index=index)


def _load_cvae(path: Path, manifest: dict) -> TrainedCVAE | None:
    record = manifest.get("cvae")
    if record is None:
        return None
    tensors = load_file(str(path / CVAE_FILE))
    model = CVAE(CVAEConfig.from_dict(record["config"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    normalizer = TensorNormalizer.from_tensors(tensors)
    return TrainedCVAE(model.eval(), normalizer, record.get("info", {}))


def migrate_store(path: Path, dtype: str = "float32") -> str:
    """Rewrite a store (format 1, or 2 in another dtype) as format 2 with `dtype` on disk; returns its version."""
    path = Path(path)
    store = load_store(path)
    manifest = store.manifest
    experts = [{k: v for k, v in e.items() if k not in ("segment", "row", "digest")} for e in manifest["experts"]]
    base_weights = path / BASE_WEIGHTS_FILE
    policy = manifest["index"].get("policy", manifest["index"]["factory"])
    artifacts = {}
    for name, record in manifest.get("artifacts", {}).items():
        tensors = load_file(str(path / record["file"]))
        artifacts[name] = Artifact(tensors, record.get("record", {}), record.get("depends_on_library", True))
    with tempfile.TemporaryDirectory(dir=path.parent) as keep:
        # The old directory is replaced by the rename: copy the base weights out of it first.
        kept_base = None
        if base_weights.exists():
            kept_base = Path(keep) / BASE_WEIGHTS_FILE
            shutil.copyfile(base_weights, kept_base)
        return write_store(path, base_model=manifest["base_model"], lora_config=store.lora_config,
                           layout=store.layout, bank=store.bank, experts=experts, index_factory=policy,
                           cvae=store.cvae, base_weights_file=kept_base, dtype=dtype, artifacts=artifacts)
