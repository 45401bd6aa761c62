"""Choose the engine: a local process pool, a local Ray instance, or a Ray cluster joined by address.

Joining a cluster ships this package to every node (Ray's runtime_env py_modules), so the nodes need the same
third-party packages but not a copy of the repository. A cluster of several nodes cannot use local paths: each node
would read and write its own disk, staged units would be invisible to the node that writes the shards, and the
output would be scattered. So a multi-node cluster with a local output or source is refused before any work.
"""

from __future__ import annotations

import logging

from pipeline.ingest.atomic import is_local, url_to_fs
from pipeline.ingest.executor import Engine, default_workers
from pipeline.ingest.sources import IngestError

log = logging.getLogger(__name__)


def start_engine(kind: str, workers: int, ray_address: str | None, output: str, sources: tuple[str, ...],
                 storage_options: dict) -> Engine:
    if kind == "local":
        return Engine("local", default_workers(workers))
    import ray

    if not ray.is_initialized():
        if ray_address:
            import pipeline

            ray.init(address=ray_address, runtime_env={"py_modules": [pipeline]}, log_to_driver=False)
        else:
            ray.init(num_cpus=default_workers(workers), include_dashboard=False, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        local = [u for u in (output, *sources) if is_local(url_to_fs(u, storage_options)[0])]
        if local:
            raise IngestError(
                f"{local[0]!r} is a local path, but the Ray cluster has {len(nodes)} nodes: each node would read and "
                "write its own disk, so staged work would be invisible to the nodes that need it and the output "
                "would be scattered. Use object storage (s3://...) for sources and --output on a multi-node cluster.")
    log.info("ray: %d node(s), %d CPUs", len(nodes), int(ray.cluster_resources().get("CPU", 0)))
    return Engine("ray", 0)
