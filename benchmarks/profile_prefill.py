"""Where a long prompt's time goes: the one-chunk prompt against the chunks of a long one, chunk by chunk, with
the card's clocks sampled meanwhile, then the kernels of a first chunk (fresh cache) and of a later one.

    python benchmarks/profile_prefill.py --chunks 32 --rows 30
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time

import torch

from bench import build_infinitevl, event_times, timed
from profile_frame import table

CLOCK_QUERY = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class ClockSampler:
    """Reads the card's SM clock, power and throttle reasons every `period` seconds (read-only queries)."""

    def __init__(self, period: float = 0.1):
        self.period, self.rows, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                line = subprocess.run(["nvidia-smi", f"--query-gpu={CLOCK_QUERY}", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                return
            self.rows.append(line)
            time.sleep(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        clocks = [float(r.split(",")[0]) for r in self.rows if r and r.split(",")[0].strip().replace(".", "").isdigit()]
        reasons = sorted({r.split(",")[-1].strip() for r in self.rows if r})
        if not clocks:
            return "no clock samples"
        return (f"{len(clocks)} samples: SM clock min {min(clocks):.0f} / median {statistics.median(clocks):.0f} / "
                f"max {max(clocks):.0f} MHz; throttle reasons seen {reasons}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32, help="chunks of the long prompt")
    parser.add_argument("--later", type=int, default=4, help="chunks fed before the profiled later chunk")
    parser.add_argument("--rows", type=int, default=30, help="rows of each profile table (0: timings only)")
    args = parser.parse_args(argv)

    from infinitevl_hf import InfiniteVLCache
    from infinitevl_hf.modeling.compat import CACHE_KWARG

    model = build_infinitevl()
    chunk = model.config.text_config.prefill_chunk_tokens
    ids = torch.randint(0, 150000, (1, chunk * args.chunks), device="cuda")
    decoder = model.model.language_model

    def prompt(length: int, cache):
        model(input_ids=ids[:, :length], use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache})

    def feed(cache, index: int):
        decoder(input_ids=ids[:, index * chunk:(index + 1) * chunk], use_cache=True, keep_last=1, **{CACHE_KWARG: cache})

    with torch.no_grad():
        prompt(2 * chunk, InfiniteVLCache(model.config))  # warm-up, as bench.py does
        one = [timed(lambda: prompt(chunk, InfiniteVLCache(model.config))) for _ in range(5)]
        print(f"one-chunk prompt ({chunk} tokens), 5 runs: " + ", ".join(f"{1e3 * s:.1f}" for s in one) + " ms")
        enqueue = []  # host time to issue the prompt's work, without waiting for it: near the total = host-bound
        for _ in range(5):
            cache = InfiniteVLCache(model.config)
            torch.cuda.synchronize()
            start = time.perf_counter()
            prompt(chunk, cache)
            enqueue.append(time.perf_counter() - start)
            torch.cuda.synchronize()
        print("  host time to issue it (no wait): " + ", ".join(f"{1e3 * s:.1f}" for s in enqueue) + " ms")

        with ClockSampler() as clocks:
            whole = timed(lambda: prompt(chunk * args.chunks, InfiniteVLCache(model.config)))
        print(f"{args.chunks}-chunk prompt in one call: {whole:.3f} s = {whole / statistics.median(one):.1f}x the "
              f"median one-chunk prompt; {1e3 * whole / args.chunks:.1f} ms per chunk. {clocks.summary()}")

        cache = InfiniteVLCache(model.config)
        per_chunk, host = [], []
        with ClockSampler() as clocks:
            for index in range(args.chunks):
                torch.cuda.synchronize()
                start = time.perf_counter()
                per_chunk += event_times(lambda: feed(cache, index), 1)
                host.append(1e3 * (time.perf_counter() - start))
        print("chunk by chunk (decoder only, events): " + ", ".join(f"{ms:.1f}" for ms in per_chunk) + " ms")
        print("  the same, host clock around each (synchronised): " + ", ".join(f"{ms:.1f}" for ms in host) + " ms")
        print(f"first {per_chunk[0]:.1f} ms, later median {statistics.median(per_chunk[1:]):.1f} ms. {clocks.summary()}")

        # back to back, fresh cache each time: is a sustained run slower than a short one by itself?
        with ClockSampler() as clocks:
            repeated = event_times(lambda: feed(InfiniteVLCache(model.config), 0), args.chunks)
        print(f"first chunk {args.chunks}x back to back: median {statistics.median(repeated):.1f} ms, "
              f"first {repeated[0]:.1f}, last {repeated[-1]:.1f}. {clocks.summary()}")

        if args.rows:
            table(lambda: feed(InfiniteVLCache(model.config), 0), args.rows, "first chunk (fresh cache)")
            later = InfiniteVLCache(model.config)
            for index in range(args.later):
                feed(later, index)
            forks = [later.fork() for _ in range(3)]
            table(lambda: feed(forks.pop(), args.later), args.rows, f"chunk {args.later} (cache after {args.later} chunks)")


if __name__ == "__main__":
    main()
