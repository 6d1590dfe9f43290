"""The sorted input listing and the deterministic shard assignment derived from it.

Two input layouts, on a local path or s3://bucket/prefix:
  folder      ImageFolder: `<class name>/<...>/<image>`; class index = position in the sorted folder names.
  webdataset  `*.tar` files of samples `<key>.<jpg|png|...>` + `<key>.cls`; each tar's headers are scanned by
              a Ray task (never on the driver) to find the members' byte ranges, so images are read later by
              ranged reads.
Only names (and, for tars, headers and the tiny cls members) are read here; the images are read by the decode
stage.

Shard assignment: a sorted ImageFolder listing is grouped by class, so consecutive inputs would make
single-class shards and a trainer shuffling within a window of shards would see only a few classes per batch.
Shard k therefore takes positions k*shard_size ... of a pseudo-random permutation of the sorted listing
(numpy's default_rng(shuffle_seed).permutation), and lists its inputs in ascending global index (reads of a
tar input stay in file order). A sample keeps its global index in the sorted listing as its key, and the same
inputs and settings give the same assignment on a re-run. With shuffle off, shard k holds inputs
k*shard_size ... (k+1)*shard_size - 1 of the sorted listing.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass

import numpy as np

from dig.data import storage

from .images import is_image_name


@dataclass(frozen=True, slots=True)  # slots: the driver holds one per input (1.28M for ImageNet)
class InputItem:
    source: str          # key relative to the input root; folder: "n01440764/x.JPEG", tar: "part-0.tar/x"
    label: int
    class_name: str
    uri: str             # where the bytes live
    offset: int = -1     # byte range inside `uri` (tar members); -1 = the whole object
    size: int = -1


@dataclass
class Listing:
    layout: str
    items: list[InputItem]   # sorted by source; position = global sample index
    classes: list[str]       # class index -> name
    ignored: list[str]       # names that are not inputs (no class folder, not an image, stray tar members)

    def fingerprint(self) -> str:
        """Identifies the listing: a re-run must see the same inputs for the shard assignment to hold."""
        h = hashlib.sha256()
        for item in self.items:
            h.update(f"{item.source}\t{item.label}\n".encode())
        return h.hexdigest()


def detect_layout(names: list[str]) -> str:
    if any(is_image_name(n) for n in names):
        return "folder"
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    raise ValueError("the input holds neither images in class folders nor .tar files")


def list_inputs(root: str, layout: str = "auto", runtime_env: dict | None = None) -> Listing:
    """The sorted listing of `root`; tar headers are scanned by Ray tasks run with `runtime_env`."""
    names = storage.list_names(root)
    if layout == "auto":
        layout = detect_layout(names)
    if layout == "folder":
        return _list_folder(root, names)
    if layout == "webdataset":
        return _list_webdataset(root, [n for n in names if n.endswith(".tar")], runtime_env)
    raise ValueError(f"unknown input layout {layout!r} (folder, webdataset or auto)")


def _list_folder(root: str, names: list[str]) -> Listing:
    images, ignored = [], []
    for name in names:
        if "/" in name and is_image_name(name) and not posixpath.basename(name).startswith("."):
            images.append(name)
        else:
            ignored.append(name)
    classes = sorted({name.split("/", 1)[0] for name in images})
    index = {c: i for i, c in enumerate(classes)}
    items = []
    for name in images:  # already sorted by list_names
        cls = name.split("/", 1)[0]
        items.append(InputItem(source=name, label=index[cls], class_name=cls, uri=storage.join(root, name)))
    return Listing("folder", items, classes, ignored)


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is everything before the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def scan_tar(uri: str) -> tuple[list[dict], list[str]]:
    """Stream one tar's headers: (samples as {key, member, offset, size, label}, ignored member names)."""
    members: dict[str, dict] = {}
    ignored = []
    with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            entry = members.setdefault(key, {"key": key})
            if ext == "cls":
                entry["label"] = int(tar.extractfile(member).read().decode("ascii").strip())
            elif is_image_name("." + ext) and "member" not in entry:
                entry.update(member=member.name, offset=member.offset_data, size=member.size)
            else:
                ignored.append(member.name)
    samples = []
    for key, entry in members.items():
        if "member" in entry and "label" in entry:
            samples.append(entry)
        else:
            ignored.append(f"{key} (no image)" if "member" not in entry else f"{entry['member']} (no cls)")
    return samples, ignored


def _list_webdataset(root: str, tar_names: list[str], runtime_env: dict | None = None) -> Listing:
    import ray

    scan = ray.remote(num_cpus=0.25, runtime_env=runtime_env)(scan_tar)
    uris = [storage.join(root, n) for n in tar_names]
    results = ray.get([scan.remote(u) for u in uris])
    items, ignored = [], []
    for tar_name, uri, (samples, tar_ignored) in zip(tar_names, uris, results):
        ignored.extend(f"{tar_name}/{m}" for m in tar_ignored)
        for s in samples:
            items.append(InputItem(source=f"{tar_name}/{s['key']}", label=s["label"], class_name=str(s["label"]),
                                   uri=uri, offset=s["offset"], size=s["size"]))
    items.sort(key=lambda it: it.source)
    num_classes = max((it.label for it in items), default=-1) + 1
    return Listing("webdataset", items, [str(i) for i in range(num_classes)], ignored)


@dataclass
class ShardSpec:
    index: int
    indices: list[int]       # global sample index (position in the sorted listing) of each item, ascending
    items: list[InputItem]

    def __post_init__(self):
        if len(self.indices) != len(self.items):
            raise ValueError(f"shard {self.index}: {len(self.indices)} indices for {len(self.items)} items")

    def to_row(self) -> dict:
        return {"shard": self.index, "indices": json.dumps(self.indices),
                "items": json.dumps([asdict(it) for it in self.items])}

    @classmethod
    def from_row(cls, row: dict) -> "ShardSpec":
        return cls(int(row["shard"]), json.loads(row["indices"]), [InputItem(**it) for it in json.loads(row["items"])])


def shard_order(num_items: int, shuffle: bool = True, seed: int = 0) -> np.ndarray:
    """Global indices in the order they are dealt into shards: a seeded permutation, or 0..n-1 unshuffled."""
    if not shuffle:
        return np.arange(num_items, dtype=np.int64)
    return np.random.default_rng(seed).permutation(num_items).astype(np.int64)


def assignment_fingerprint(order: np.ndarray) -> str:
    """Identifies the deal order, so a numpy whose permutation differs cannot silently re-deal a resumed job."""
    return hashlib.sha256(np.ascontiguousarray(order, dtype="<i8").tobytes()).hexdigest()


def assign_shards(items: list[InputItem], shard_size: int, shuffle: bool = True, seed: int = 0,
                  order: np.ndarray | None = None) -> list[ShardSpec]:
    """Shard k gets positions k*shard_size ... of `order` (default: shard_order(len(items), shuffle, seed)),
    sorted by global index; every input lands in exactly one shard."""
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    if order is None:
        order = shard_order(len(items), shuffle, seed)
    shards = []
    for k, start in enumerate(range(0, len(items), shard_size)):
        indices = sorted(order[start:start + shard_size].tolist())
        shards.append(ShardSpec(k, indices, [items[i] for i in indices]))
    return shards
