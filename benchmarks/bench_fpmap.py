"""The free-page map's hot paths, as ratios to a numpy memcpy of the same bytes (same run).

    python3 benchmarks/bench_fpmap.py              # a 1 TiB guest: 2^28 pfns, a 32 MiB bitmap
    python3 benchmarks/bench_fpmap.py --size 64G   # quick
    python3 benchmarks/bench_fpmap.py --smoke      # 4 GiB, one repeat (CI: it still runs)

The guest is :meth:`BuddyModel.after_workload` with a flat layout (so 1 TiB is exactly 32 chunks
of 32 bitmaps of 32 KiB), scanned by the reference scanner into the protocol's chunks once.
Then, each best of ``--repeat``:

* memcpy: ``np.copyto`` of a bitmap-sized buffer into a touched one (the baseline);
* request: ``BitmapRounds.request`` — a new map, both bitmaps zeroed (page faults included);
  a device does this before the guest answers;
* ingest: every chunk of the round through ``receive`` — the device's real path: header
  checks, the OR, holes, coverage bookkeeping;
* coverage: the first ``coverage()`` of the round, which writes the covered bitmap;
* ranges: ``FreePageMap.ranges()`` of the round's map (the guest's fragmentation), next to
  the naive ``np.unpackbits`` + ``np.diff``;
* memory: tracemalloc's peak (numpy reports its buffers to it) over a round, and over
  ranges, as multiples of the bitmap size.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time
import tracemalloc
from typing import Callable

import numpy as np

from vballoon.fpmap import BitmapRounds, Verdict
from vballoon.sim.scanner import BuddyModel, driver_chunks
from vballoon.units import parse_size



def best(fn: Callable[[], object], repeat: int,
         setup: Callable[[], object] = lambda: None) -> float:
    times = []
    for _ in range(repeat):
        setup()
        gc.collect()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def naive_ranges(words: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.view(np.int8), [0]))))
    return np.column_stack((edges[0::2], edges[1::2] - edges[0::2]))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1T", help="guest RAM (e.g. 64G, 1T)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="4 GiB, one repeat: checks it runs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.size, args.repeat = "4G", 1
    size = parse_size(args.size)

    t = time.perf_counter()
    model = BuddyModel.after_workload(size, args.seed, layout="flat")
    chunks = list(driver_chunks(model, 0))
    nbytes = sum(len(b) for c in chunks for b in c.bitmaps)
    print(f"guest {size / (1 << 30):g} GiB: {model.max_pfn} pfns, {model.free_pages()} free "
          f"in {len(model.block_pfn)} buddy blocks; {len(chunks)} chunks, "
          f"{sum(len(c.bitmaps) for c in chunks)} bitmaps, {nbytes / (1 << 20):g} MiB "
          f"(model + scan {time.perf_counter() - t:.1f} s)")

    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    dst = np.ones_like(src)
    memcpy = best(lambda: np.copyto(dst, src), args.repeat * 3)
    print(f"\nbaseline  numpy memcpy of {nbytes / (1 << 20):g} MiB: {memcpy * 1e3:.2f} ms\n")

    rounds = BitmapRounds(model.layout)
    state: dict = {}
    # the same chunks, all CONT: the round keeps receiving (its bitmaps are not compacted)
    cont = [dataclasses.replace(c, flags=0) for c in chunks]

    def request() -> None:
        rnd = state["round"] = rounds.request(0.0)
        state["bufs"] = [dataclasses.replace(c, id=rnd.id).buffers() for c in chunks]
        state["cont"] = [dataclasses.replace(c, id=rnd.id).buffers() for c in cont]

    def ingest() -> None:
        for bufs in state["cont"]:
            verdict = rounds.receive(bufs, now=0.0)
        assert verdict is Verdict.ACCEPTED

    def ingest_done() -> None:
        for bufs in state["bufs"]:
            verdict = rounds.receive(bufs, now=0.0)
        assert verdict is Verdict.DONE

    def drop() -> None:
        state.clear()
        rounds.abort("benchmark", 0.0)

    def fresh() -> None:
        drop()
        request()

    t_request = best(request, args.repeat, drop)
    t_ingest = best(ingest, args.repeat, fresh)
    fpm = state["round"].map                          # receiving: bitmaps
    t_cover = best(fpm.coverage, 1)                   # the first call writes the covered bitmap
    assert np.array_equal(fpm.free, model.free_bitmap()) and fpm.coverage() == 1.0

    t_ranges = best(fpm.ranges, args.repeat)
    n = len(fpm.ranges())
    t_naive = best(lambda: naive_ranges(fpm.free), max(1, args.repeat // 3))
    assert np.array_equal(naive_ranges(fpm.free), fpm.ranges())
    bm = fpm.free.nbytes

    t_done = best(ingest_done, args.repeat, fresh)
    kept = state["round"].map                         # DONE: compacted
    assert kept.compacted and np.array_equal(kept.ranges(), fpm.ranges())
    t_kept_ranges = best(kept.ranges, args.repeat)

    def ingest_cont_then_compact() -> None:
        state["round"].map.compact()
    t_compact = best(ingest_cont_then_compact, args.repeat, lambda: (fresh(), ingest()))

    drop()
    del fpm, kept
    gc.collect()
    tracemalloc.start()
    request()
    ingest()
    fpm = state["round"].map
    fpm.coverage()
    round_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fpm.ranges()
    ranges_peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    drop()

    rows = [
        ("request(): a new map, zeroed (while the guest scans)", t_request, "informative"),
        (f"OR-ingest: {len(chunks)} chunks through receive()", t_ingest, "target <= 1.2x"),
        ("coverage() after the round (writes covered bits)", t_cover, "informative"),
        (f"ranges(): {n} ranges from the bitmap, C kernel", t_ranges, "target <= 2x"),
        ("ranges, naive np.unpackbits + np.diff", t_naive, "for comparison"),
        ("compact(): an ended round's bitmaps -> runs", t_compact, "once per round"),
        ("ingest to DONE (the last chunk compacts)", t_done, "informative"),
        ("ranges() of a finished (compacted) round", t_kept_ranges, "informative"),
    ]
    for name, secs, note in rows:
        print(f"{name:54s} {secs * 1e3:8.2f} ms {secs / memcpy:8.2f}x memcpy  ({note})")
    print("floors: the OR reads the chunk (in guest memory) and reads+writes the map, so it "
          "moves 3x the\n  bytes a memcpy moves 2x of (~1.5x memcpy when memory-bound); ranges "
          "must read\n  every word once (>= 0.5x memcpy) and branch per run.")
    print(f"\nbitmap {bm / (1 << 20):g} MiB; tracemalloc peaks:")
    print(f"  a round (request, ingest, coverage): {round_peak / bm:.2f}x bitmap = the free bitmap "
          f"+ {round_peak / bm - 1:.2f}x extra (covered 1x; target: extra <= 2x)")
    print(f"  ranges(): {ranges_peak / bm:.3f}x bitmap "
          f"(the result itself: {n} x 16 bytes = {16 * n / bm:.3f}x)")
    print(f"  a finished round kept: {state_kept_bytes(model, chunks) / bm:.3f}x its bitmap "
          f"(free + covered runs; a running round: 2x) (target <= 0.2x)")


def state_kept_bytes(model: BuddyModel, chunks: list) -> int:
    rounds = BitmapRounds(model.layout)
    rnd = rounds.request(0.0)
    for c in chunks:
        rounds.receive(dataclasses.replace(c, id=rnd.id).buffers(), now=0.0)
    assert rnd.map.compacted
    return rnd.map.allocated_bytes


if __name__ == "__main__":
    main()
