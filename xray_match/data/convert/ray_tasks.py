"""Writing a split's shards as Ray tasks (``--ray``): one task per missing shard, each writing its
shard straight to the output folder, which every node must see."""

from __future__ import annotations

from typing import Any, Callable

from tqdm.auto import tqdm

from xray_match.data.convert.plan import ConversionError, ConvertOptions
from xray_match.data.format import Manifest, ShardInfo, join
from xray_match.data.writer import _complete, add_shard, finish_write, start_split, write_shard
from xray_match.runtime_env import worker_env_vars


def _ray_shard_task(path: str, records: list[dict[str, Any]], build: Callable[[dict[str, Any]], dict[str, Any]]) -> ShardInfo:
    return write_shard(path, (build(r) for r in records))


def write_records_ray(
    root: str, dataset: str, split: str, records: list[dict[str, Any]],
    build: Callable[[dict[str, Any]], dict[str, Any]], opts: ConvertOptions, info: dict[str, Any], finish: bool,
) -> Manifest:
    """The Ray twin of :func:`~xray_match.data.writer.write_split`: same manifest bookkeeping (so a
    local run resumes a Ray run and back), one task per missing shard, each writing its shard
    straight to ``root``. Joins ``opts.ray_address`` (None: ``$RAY_ADDRESS`` or a running cluster,
    else a local one) with the environment of every Ray process (:func:`worker_env_vars`)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=opts.ray_address, log_to_driver=False, runtime_env={"env_vars": worker_env_vars()})
        started = True
    try:
        manifest, todo = start_split(root, dataset, split, len(records), opts.maxcount, info)
        task = ray.remote(num_cpus=1)(_ray_shard_task)
        build_ref = ray.put(build)
        pending = {task.remote(join(root, name), records[start:stop], build_ref): name for name, start, stop in todo}
        bar = tqdm(total=len(records), desc=f"{dataset}/{split} (ray)", unit="img", disable=not opts.progress)
        bar.update(manifest.count(split))
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                entry: ShardInfo = ray.get(ref)
                if not _complete(root, entry):
                    raise ConversionError(
                        f"{join(root, name)}: written by a Ray task but not visible from the driver; with --ray the "
                        f"output must be storage every node shares (an s3:// or gs:// URL, or a shared file system)"
                    )
                add_shard(root, manifest, split, entry)
                bar.update(entry.count)
        bar.close()
        return finish_write(root, manifest) if finish else manifest
    finally:
        if started:
            ray.shutdown()
