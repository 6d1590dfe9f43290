"""The sorted input listing and the deterministic shard assignment derived from it.

Two input layouts, on a local path or s3://bucket/prefix:
  folder      ImageFolder: `<class name>/<...>/<image>`; class index = position in the sorted folder names.
  webdataset  `*.tar` files of samples `<key>.<jpg|png|...>` + `<key>.cls`; each tar's headers are scanned by
              a Ray task (never on the driver) to find the members' byte ranges, so images are read later by
              ranged reads.
Only names (and, for tars, headers and the tiny cls members) are read here; the images are read by the decode
stage. Sample i of the sorted listing goes to shard i // shard_size, so a re-run assigns every input to the
same shard.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass

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
    first: int               # global sample index of the shard's first input
    items: list[InputItem]

    def to_row(self) -> dict:
        return {"shard": self.index, "first": self.first, "items": json.dumps([asdict(it) for it in self.items])}

    @classmethod
    def from_row(cls, row: dict) -> "ShardSpec":
        return cls(int(row["shard"]), int(row["first"]), [InputItem(**it) for it in json.loads(row["items"])])


def assign_shards(items: list[InputItem], shard_size: int) -> list[ShardSpec]:
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    return [ShardSpec(i // shard_size, i, items[i:i + shard_size]) for i in range(0, len(items), shard_size)]
