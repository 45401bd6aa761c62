"""What the ingest driver pays per result on Ray: driver CPU per result of executor._run_ray's completion callbacks
(ObjectRef.future() into a queue) against two ways built on ray.wait over every ref in flight: the way before it
(block for the first ready result, sweep the rest with timeout 0: one round per result when results arrive one at a
time) and a gathering wait (block for the first, then gather for GATHER_S: fewer rounds). In one process.

    python -m bench.ray_driver [--in-flight 2559] [--rates 140 330] [--seconds 6]

Local Ray (2 CPUs). The tasks in flight are calls parked on one async actor (they hold no worker each), released
one by one at a steady rate, the way a cluster's tasks end; as each result is taken the driver submits another, so
the window stays full, as in executor._run_ray. Prints, per rate and per way, the driver process's CPU
milliseconds per result (time.process_time over the loop: every thread of the driver, Ray's own included), its
rounds (ray.wait pairs; one per result for the callbacks), medians of 3 runs.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import queue
import statistics
import time


def one_per_round(refs: list) -> list:
    """executor._run_ray before the completion callbacks (O(in flight) per result)."""
    import ray

    ready, rest = ray.wait(refs, num_returns=1)
    if rest:
        more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
        ready += more
    return ready


GATHER_S = 0.02


def gathering(refs: list) -> list:
    """Block for the first ready result, then gather the others ready within GATHER_S: fewer rounds, each still
    O(in flight)."""
    import ray

    ray.wait(refs, num_returns=1)
    return ray.wait(refs, num_returns=len(refs), timeout=GATHER_S)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-flight", type=int, default=2559)
    ap.add_argument("--rates", type=float, nargs="+", default=[140.0, 330.0], help="results a second")
    ap.add_argument("--seconds", type=float, default=6.0, help="measured per run")
    a = ap.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(max_concurrency=a.in_flight + 64)
    class Gate:
        """Call i waits for its release; release(start, n, rate) lets calls start.. go at `rate` a second."""

        def __init__(self):
            self.events: dict[int, asyncio.Event] = {}

        async def wait(self, i: int) -> int:
            await self.events.setdefault(i, asyncio.Event()).wait()
            return i

        async def release(self, start: int, n: int, rate: float) -> None:
            t0 = time.monotonic()
            for k in range(n):
                await asyncio.sleep(max(0.0, t0 + k / rate - time.monotonic()))
                self.events.setdefault(start + k, asyncio.Event()).set()

    def run_futures(rate: float) -> tuple[float, int]:
        """Completion callbacks (ObjectRef.future()) into a queue: no wait over the refs in flight at all."""
        gate = Gate.remote()
        n = int(rate * a.seconds)
        done: queue.SimpleQueue = queue.SimpleQueue()

        futures = []

        def submit(i: int) -> None:
            futures.append(gate.wait.remote(i).future())
            futures[-1].add_done_callback(done.put)

        for i in range(a.in_flight):
            submit(i)
        next_id = a.in_flight
        time.sleep(2)
        gate.release.remote(0, n, rate)
        taken: set[int] = set()
        cpu0 = time.process_time()
        while len(taken) < n:
            taken.add(done.get().result())
            submit(next_id)
            next_id += 1
        cpu = time.process_time() - cpu0
        ray.kill(gate)
        # The calls still parked fail with the actor: let their callbacks run now, not in the next run's time.
        concurrent.futures.wait(futures, timeout=60)
        return cpu / n, n

    def run(collect, rate: float) -> tuple[float, int]:
        gate = Gate.remote()
        n = int(rate * a.seconds)
        pending = {gate.wait.remote(i): i for i in range(a.in_flight)}
        next_id = a.in_flight
        time.sleep(2)  # every call parked on the actor
        gate.release.remote(0, n, rate)
        taken: set[int] = set()
        rounds, cpu0 = 0, time.process_time()
        while len(taken) < n:
            rounds += 1
            for ref in collect(list(pending)):
                taken.add(ray.get(ref))
                del pending[ref]
                pending[gate.wait.remote(next_id)] = next_id
                next_id += 1
        cpu = time.process_time() - cpu0
        ray.kill(gate)
        return cpu / n, rounds

    print(f"{a.in_flight} tasks in flight")
    print("| results a second | way | driver CPU ms a result | rounds |")
    print("| --- | --- | --- | --- |")
    for rate in a.rates:
        for name, collect in (("one per round (before)", one_per_round),
                              (f"gathering {GATHER_S * 1e3:.0f} ms", gathering),
                              ("completion callbacks (executor.py)", None)):
            runs = [run(collect, rate) if collect else run_futures(rate) for _ in range(3)]
            cpu, rounds = (statistics.median(r[k] for r in runs) for k in range(2))
            print(f"| {rate:.0f} | {name} | {cpu * 1e3:.2f} | {rounds:.0f} |")
    ray.shutdown()


if __name__ == "__main__":
    main()
