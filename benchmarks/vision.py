"""Vision client throughput against ``ainode simulate-vision`` (200 ms latency, 60 requests a
minute enforced by the server), with 4 calls in flight.

    python -m benchmarks.vision [--studies 100] [--latency-ms 200] [--rpm 60]

Prints studies/minute, the most requests the server saw in any rolling minute, and how many it
refused with 429: with the client's limiter at the server's limit, that should be none.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from pydantic import SecretStr

from analysis.vision.client import VisionClient
from conf import VisionSettings
from tests.data.images import noise_image
from tests.nodes import simulator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--rpm", type=int, default=60)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()

    image = noise_image(1024, seed=0)
    sent_at: list[float] = []
    lock = threading.Lock()

    def on_request(_request: httpx.Request) -> None:
        with lock:
            sent_at.append(time.monotonic())

    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator(Path(tmp), "--latency-ms", str(args.latency_ms), "--rpm-limit", str(args.rpm)) as url,
    ):
        settings = VisionSettings(
            provider="simulator",
            base_url=url,
            api_key=SecretStr("sk-bench"),
            requests_per_minute=args.rpm,
            max_concurrency=args.in_flight,
            max_retries=10,
        )
        http = httpx.Client(
            timeout=30,
            event_hooks={"request": [on_request]},
            limits=httpx.Limits(max_connections=args.in_flight),
        )
        with VisionClient(settings, http=http) as vision, ThreadPoolExecutor(args.in_flight) as pool:
            started = time.monotonic()
            results = list(
                pool.map(lambda n: vision.analyse(f"1.2.{n}", [image], "Describe."), range(args.studies))
            )
            elapsed = time.monotonic() - started
    calls = [call for result in results for call in result.calls]
    refused = sum(call.status == 429 for call in calls)
    busiest = max(sum(1 for s in sent_at if t - 60 < s <= t) for t in sent_at)
    latencies = [call.latency_ms for call in calls if call.status == 200]
    print(
        f"{args.studies} studies, {args.in_flight} in flight, simulator {args.latency_ms:g} ms, "
        f"limit {args.rpm}/min"
    )
    print(f"  elapsed {elapsed:.1f} s: {args.studies / elapsed * 60:.1f} studies/min")
    print(f"  busiest rolling minute: {busiest} requests (limit {args.rpm}); 429 refusals: {refused}")
    print(f"  latency p50 {statistics.median(latencies):.0f} ms, max {max(latencies):.0f} ms")
    print(
        f"  unlimited, {args.in_flight} in flight would be "
        f"{60_000 / args.latency_ms * args.in_flight:.0f} studies/min"
    )


if __name__ == "__main__":
    main()
