"""What the ingest driver pays per result on Ray (executor._run_ray): one blocking ray.wait for the first ready
result and a non-blocking sweep of the rest, over every task in flight (at most 2 x the cluster's CPUs).

    python -m bench.ray_driver [--in-flight 2559] [--results 200]

Local Ray (2 CPUs); the tasks in flight are calls parked on one async actor (they hold no worker each), and each
measured result is an object already in the store, so a round finds exactly one ready result: the worst case,
results arriving one at a time. Prints milliseconds per result (median of 3 runs), for the wait pair executor.py
makes and for the blocking wait alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", type=int, default=2559)
    ap.add_argument("--results", type=int, default=200)
    a = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_concurrency=a.in_flight + 16)
    class Gate:
        def __init__(self):
            self.event = asyncio.Event()

        async def wait(self):
            await self.event.wait()

        async def open(self):
            self.event.set()

    gate = Gate.remote()
    pending = [gate.wait.remote() for _ in range(a.in_flight)]
    time.sleep(3)  # every call parked on the actor
    pair, alone = [], []
    for _ in range(3):
        ready = [ray.put(1) for _ in range(a.results)]
        start = time.perf_counter()
        for ref in ready:  # as executor._run_ray does it
            refs = [ref, *pending]
            _, rest = ray.wait(refs, num_returns=1)
            ray.wait(rest, num_returns=len(rest), timeout=0)
        pair.append((time.perf_counter() - start) / a.results)
        start = time.perf_counter()
        for ref in ready:
            ray.wait([ref, *pending], num_returns=1)
        alone.append((time.perf_counter() - start) / a.results)
    ray.get(gate.open.remote())
    ray.shutdown()
    print(f"{a.in_flight} tasks in flight, one result ready per round: {statistics.median(pair) * 1e3:.2f} ms a "
          f"result (wait + sweep, executor.py), {statistics.median(alone) * 1e3:.2f} ms for the blocking wait alone")


if __name__ == "__main__":
    main()
