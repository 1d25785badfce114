"""``xray-match data verify DIR``: read every sample of every shard and report what is wrong.

Besides each sample (through the training reader's checks) it checks the folder as a whole: that
its writer finished, that each split holds its planned count, that every listed tar exists and no
unlisted tar lies beside them, and that no ``image_id`` is used twice in the data set.
"""

from __future__ import annotations

from typing import Iterator

from tqdm.auto import tqdm

from xray_match.data.format import (
    ShardFormatError,
    count_problems,
    incomplete_problem,
    join,
    read_manifest,
    sample_where,
)
from xray_match.data.io import list_names
from xray_match.data.reader import decode_sample, iter_raw
from xray_match.data.writer import sha256_file


def verify(root: str, checksums: bool = True, progress: bool = True) -> list[str]:
    """All problems found, one line each naming the file (and key); empty when the data set is sound."""
    try:
        manifest = read_manifest(root, allow_incomplete=True)
    except ShardFormatError as e:
        return [str(e)]
    problems = [] if manifest.complete else [incomplete_problem(root)]
    problems += count_problems(root, manifest)
    present, listed = list_names(root), manifest.shard_names()
    problems += [f"{join(root, n)}: a tar the manifest does not list" for n in sorted(present - listed) if n.endswith(".tar")]
    first_use: dict[str | int, str] = {}  # image_id -> where it was first seen
    total = sum(manifest.count(sp) for sp in manifest.splits)
    bar = tqdm(total=total, desc=f"verify {manifest.dataset}", unit="img", disable=not progress)
    for split, shards in sorted(manifest.splits.items()):
        for entry in shards:
            url = join(root, entry.name)
            if entry.name not in present:
                problems.append(f"{url}: listed in the manifest but missing")
                continue
            n = 0
            try:
                if checksums:
                    digest, _ = sha256_file(url)
                    if digest != entry.sha256:
                        problems.append(f"{url}: sha256 {digest[:12]}... does not match the manifest ({entry.sha256[:12]}...)")
                for raw in iter_raw(url):
                    n += 1
                    bar.update(1)
                    try:
                        meta = decode_sample(raw)["meta"]
                    except ShardFormatError as e:
                        problems.append(str(e))
                        continue
                    where = sample_where(raw)
                    if meta.get("split") != split:
                        problems.append(f"{where}: json.split {meta.get('split')!r} in split {split!r}")
                    image_id = meta["image_id"]
                    if image_id in first_use:
                        problems.append(f"{where}: image_id {image_id!r} is used twice (also {first_use[image_id]})")
                    else:
                        first_use[image_id] = where
            except ShardFormatError as e:
                problems.append(str(e))
            if n != entry.count:
                problems.append(f"{url}: {n} samples, the manifest says {entry.count}")
    bar.close()
    return problems


def iter_problems(root: str) -> Iterator[str]:
    yield from verify(root)
