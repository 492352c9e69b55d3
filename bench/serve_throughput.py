"""API server throughput: N concurrent clients against one at a time, with batching and without.

python -m bench.serve_throughput --model_weights outputs/demo --clients 1 8 --requests 64

Two servers run as their own processes (`python -m runtime.serve` on free 127.0.0.1 ports), one
batching (the defaults: up to 8 requests per generate) and one with `--no_batching`. N client
threads of the official `openai` client each send their share of the held-out demo questions
(image as a data: URL, greedy) one after another. `--rounds` rounds alternate which server goes
first (the machine may be shared). Reported per mode and N: the median requests/s over the
rounds, p50 and p95 latency over all requests, whether every answer equals the no-batching
one-client answer, and the median paired ratio batching / no batching.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai

MODES = {"batching": [], "no batching": ["--no_batching"]}


def questions(shapes: Path, count: int) -> list[tuple[str, str]]:
    """(data URL, question) of the first held-out records, cycling when more are asked for."""
    records = json.loads((shapes / "test.json").read_text(encoding="utf-8"))
    found = []
    for record in records[: min(count, len(records))]:
        data = base64.b64encode((shapes / record["image"]).read_bytes()).decode()
        text = record["conversations"][0]["value"].replace("<image>\n", "")
        found.append((f"data:image/png;base64,{data}", text))
    return [found[i % len(found)] for i in range(count)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(model_weights: str, flags: list[str]):
    """`python -m runtime.serve` in its own process; yields its base URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "runtime.serve", "--model_weights", model_weights,
               "--served_model_name", "demo", "--port", str(port), *flags]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}): {' '.join(command)}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 300 s")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_clients(url: str, asks: list[tuple[str, str]], clients: int, max_tokens: int) -> dict:
    """Each of `clients` threads sends every clients-th question in turn; timings and answers."""
    local = threading.local()

    def one(index: int) -> tuple[float, str]:
        if not hasattr(local, "client"):
            local.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        image, text = asks[index]
        content = [{"type": "image_url", "image_url": {"url": image}},
                   {"type": "text", "text": text}]  # fmt: skip
        start = time.perf_counter()
        reply = local.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )
        return time.perf_counter() - start, reply.choices[0].message.content

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(min(clients * 2, len(asks)))))  # warm-up
        start = time.perf_counter()
        results = list(pool.map(one, range(len(asks))))
        wall = time.perf_counter() - start
    return {
        "requests_per_s": len(asks) / wall,
        "latencies": [seconds for seconds, _ in results],
        "answers": [answer for _, answer in results],
    }


def summary(mode: str, clients: int, runs: list[dict], reference: list[str]) -> dict:
    """Median requests/s over the rounds; p50 / p95 over every request of every round."""
    latencies = sorted(seconds for run in runs for seconds in run["latencies"])
    return {
        "mode": mode,
        "clients": clients,
        "requests_per_s": statistics.median(run["requests_per_s"] for run in runs),
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "same_answers": all(run["answers"] == reference for run in runs),
    }


def markdown_table(rows: list[dict]) -> str:
    lines = ["| mode | clients | requests/s (median) | p50 ms | p95 ms | answers as alone |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['mode']} | {row['clients']} | {row['requests_per_s']:.2f} | "
                     f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['same_answers']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_weights", default="outputs/demo")
    parser.add_argument("--shapes", default="demo_assets/shapes", help="held-out questions")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=64, help="timed requests per run")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per setting")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--server_flags", nargs=argparse.REMAINDER, default=[],
                        help="the rest: flags for both servers (e.g. --batch_window_ms 20)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not Path(args.model_weights).is_dir():
        raise SystemExit(f"--model_weights {args.model_weights}: not found (sh train.sh builds it)")
    asks = questions(Path(args.shapes), args.requests)
    modes = {mode: MODES[mode] for mode in args.modes}
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for c in args.clients for m in modes}
    with ExitStack() as stack:  # both servers up; the rounds alternate which goes first
        urls = {mode: stack.enter_context(server(args.model_weights, flags + args.server_flags))
                for mode, flags in modes.items()}  # fmt: skip
        for round_index in range(args.rounds):
            for clients in args.clients:
                for mode in list(modes)[:: 1 if round_index % 2 else -1]:
                    run = run_clients(urls[mode], asks, clients, args.max_tokens)
                    runs[mode, clients].append(run)
                    print(f"round {round_index}: {mode}, {clients} clients: "
                          f"{run['requests_per_s']:.2f} requests/s", flush=True)  # fmt: skip
        batch_sizes = httpx.get(f"{urls[args.modes[0]]}/health").json()["batch_sizes"]
    reference = runs[args.modes[-1], min(args.clients)][0]["answers"]
    rows = [summary(mode, clients, found, reference) for (mode, clients), found in runs.items()]
    print(markdown_table(rows), end="")
    for clients in args.clients if len(modes) == 2 else []:
        ratios = [b["requests_per_s"] / n["requests_per_s"]
                  for b, n in zip(runs["batching", clients], runs["no batching", clients], strict=True)]  # fmt: skip
        print(f"{clients} clients: batching / no batching = {statistics.median(ratios):.2f}x "
              f"requests/s (median of {len(ratios)} paired rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)})")  # fmt: skip
    print(f"batch sizes of the {args.modes[0]} server (size: batches, warm-ups included): "
          f"{batch_sizes}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
