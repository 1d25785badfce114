"""``xray-match data verify DIR``: read every sample of every shard and report what is wrong."""

from __future__ import annotations

from typing import Iterator

from tqdm.auto import tqdm

from xray_match.data.format import ShardFormatError, join, read_manifest
from xray_match.data.reader import decode_sample, iter_raw
from xray_match.data.writer import sha256_file


def verify(root: str, checksums: bool = True, progress: bool = True) -> list[str]:
    """All problems found, one line each naming shard and key; empty when the data set is sound."""
    try:
        manifest = read_manifest(root)
    except ShardFormatError as e:
        return [str(e)]
    problems: list[str] = []
    total = sum(manifest.count(sp) for sp in manifest.splits)
    bar = tqdm(total=total, desc=f"verify {manifest.dataset}", unit="img", disable=not progress)
    for split, shards in sorted(manifest.splits.items()):
        for entry in shards:
            url = join(root, entry.name)
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
                    if meta.get("split") != split:
                        problems.append(f"{url}: key {raw['__key__']!r}: json.split {meta.get('split')!r} in split {split!r}")
            except FileNotFoundError:
                problems.append(f"{url}: listed in the manifest but missing")
                continue
            except ShardFormatError as e:
                problems.append(str(e))
            if n != entry.count:
                problems.append(f"{url}: {n} samples, the manifest says {entry.count}")
    bar.close()
    return problems


def iter_problems(root: str) -> Iterator[str]:
    yield from verify(root)
