"""Fuzz the `.uqdm` decoder at scale: `python scripts/fuzz_decoder.py --cases 10000 [--seed S]`.

Runs the mutation strategies of `uqdm/codec/fuzz.py` (the ones `tests/test_fuzz_decoder.py` samples)
on a small real file, decodes every mutated file with the Python API (and every `--cli-every`-th
with `uqdm decompress`, `uqdm info` and `uqdm truncate`, in-process), and prints the count of each
outcome, per strategy and in all. The decodes run in a worker process that is killed and replaced
when one overruns the time limit (a single huge tensor operation does not notice SIGALRM), or that
dies (`crash`). Exits 1 if any case was a bug (traceback, hang, unbounded allocation, wrong
picture, unclear error), 0 otherwise. A case is reproducible from its strategy and seed:
`--strategy NAME --case-seed N` reruns one and prints its details.
"""

import argparse
import collections
import multiprocessing
import random
import sys
import time

import torch

from uqdm.codec import fuzz


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=1000, help="mutated files to decode (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the case sequence (default 0)")
    p.add_argument("--cli-every", type=int, default=20, metavar="K",
                   help="also run `uqdm decompress` (and info, truncate) on every K-th case (0: never; default 20)")
    p.add_argument("--time-limit", type=float, default=fuzz.TIME_LIMIT, help="seconds before a decode is a hang")
    p.add_argument("--strategy", choices=sorted(fuzz.MUTATIONS), action="append",
                   help="only these strategies (repeatable; default all)")
    p.add_argument("--case-seed", type=int, help="rerun the single case (--strategy NAME) with this seed")
    p.add_argument("--examples", type=int, default=3, help="bug examples to print per (strategy, outcome)")
    return p.parse_args(argv)


class Worker:
    """Classifies cases in a child process; a spare child stands ready to replace one that is
    killed for overrunning the time limit or that dies."""

    def __init__(self, time_limit: float):
        self.time_limit = time_limit
        self.context = multiprocessing.get_context("spawn")
        self.current, self.spare = self._spawn(), self._spawn()
        self.sample_data = self._ready(self.current)

    def _spawn(self):
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_serve, args=(child, self.time_limit), daemon=True)
        process.start()
        child.close()
        return process, parent

    @staticmethod
    def _ready(worker) -> bytes:
        message, data = worker[1].recv()
        assert message == "ready"
        return data

    def _replace(self) -> None:
        process, conn = self.current
        process.kill()
        process.join()
        conn.close()
        self.current, self.spare = self.spare, self._spawn()
        if self._ready(self.current) != self.sample_data:
            raise RuntimeError("the worker built a different sample file")

    def run(self, kind: str, data: bytes, check: bool) -> list[fuzz.Result]:
        n = 1 if kind == "api" else 3
        process, conn = self.current
        start = time.perf_counter()
        try:
            conn.send((kind, data, check))
            # the child's own watchdog answers at the limit unless a C++ operation holds it up
            if conn.poll(n * (self.time_limit + 2.0)):
                return conn.recv()
            outcome, detail = "hang", f"killed after {time.perf_counter() - start:.1f} s"
        except (EOFError, BrokenPipeError, ConnectionResetError):
            process.join(5)
            outcome, detail = "crash", f"the worker died (exit code {process.exitcode})"
        self._replace()
        return [fuzz.Result(outcome, detail, time.perf_counter() - start)]

    def close(self) -> None:
        for process, conn in (self.current, self.spare):
            process.kill()
            process.join()
            conn.close()


def _serve(conn, time_limit: float) -> None:
    torch.set_num_threads(1)  # the decodes are tiny: one thread is fastest and leaves the machine alone
    module = fuzz.tiny_module()
    sample = fuzz.make_sample(module)
    with fuzz.workdir() as work:
        ckpt = fuzz.save_module(module, work / "tiny.ckpt")
        conn.send(("ready", sample.data))
        while True:
            try:
                kind, data, check = conn.recv()
            except EOFError:
                return
            if kind == "api":
                conn.send([fuzz.classify(module, sample, data, check, time_limit)])
            else:
                conn.send([fuzz.classify_cli(ckpt, sample, data, work, check, time_limit),
                           *fuzz.classify_cli_tools(data, work, time_limit)])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    strategies = args.strategy or sorted(fuzz.MUTATIONS)
    module = fuzz.tiny_module()
    sample = fuzz.make_sample(module)
    print(f"sample file: {len(sample.data)} bytes, header {sample.ends[0]} bytes, chunk ends {list(sample.ends[1:])}, "
          f"{sample.image.shape[2]}×{sample.image.shape[1]} image in {sample.header.tile}-pixel tiles, "
          f"T = {sample.header.n_timesteps}", flush=True)

    if args.case_seed is not None:
        if len(strategies) != 1:
            sys.exit("--case-seed needs exactly one --strategy")
        data = fuzz.mutate(strategies[0], args.case_seed, sample)
        result = fuzz.classify(module, sample, data, strategies[0] not in fuzz.NO_PICTURE_ORACLE, args.time_limit)
        print(f"{strategies[0]} seed {args.case_seed}: {result.outcome} in {result.seconds:.3f} s: {result.detail}")
        print(f"input ({len(data)} bytes): {data.hex()}")
        return int(result.bug)

    worker = Worker(args.time_limit)
    if worker.sample_data != sample.data:
        raise RuntimeError("the worker built a different sample file")
    try:
        rng = random.Random(args.seed)
        counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        cli_counts: collections.Counter = collections.Counter()
        examples: dict[tuple[str, str], list[str]] = collections.defaultdict(list)
        slowest = (0.0, "")
        start = time.perf_counter()
        for i in range(args.cases):
            strategy, case_seed = rng.choice(strategies), rng.getrandbits(32)
            data = fuzz.mutate(strategy, case_seed, sample)
            check = strategy not in fuzz.NO_PICTURE_ORACLE
            results = [("api", r) for r in worker.run("api", data, check)]
            if args.cli_every and i % args.cli_every == 0:
                cli = worker.run("cli", data, check)
                results += [("cli" if j == 0 else "cli-tools", r) for j, r in enumerate(cli)]
            for kind, result in results:
                if kind == "api":
                    counts[strategy][result.outcome] += 1
                else:
                    cli_counts[(kind, result.outcome)] += 1
                if result.seconds > slowest[0]:
                    slowest = (result.seconds, f"{strategy} seed {case_seed} ({kind})")
                if result.bug and len(examples[(strategy, result.outcome)]) < args.examples:
                    examples[(strategy, result.outcome)].append(f"{kind} seed {case_seed}: {result.detail}")
            if (i + 1) % 1000 == 0:
                print(f"  {i + 1} cases, {time.perf_counter() - start:.0f} s", flush=True)
        wall = time.perf_counter() - start
    finally:
        worker.close()

    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    outcomes = [*fuzz.OK, *sorted(set(total) - set(fuzz.OK))]
    width = max(map(len, strategies)) + 2
    print(f"\n{args.cases} cases (seed {args.seed}) in {wall:.0f} s; Python API outcomes:")
    print("strategy".ljust(width) + "".join(o.rjust(max(10, len(o) + 2)) for o in outcomes))
    for strategy in strategies:
        if counts[strategy]:
            print(strategy.ljust(width) + "".join(str(counts[strategy][o]).rjust(max(10, len(o) + 2)) for o in outcomes))
    print("total".ljust(width) + "".join(str(total[o]).rjust(max(10, len(o) + 2)) for o in outcomes))
    if cli_counts:
        print("command line (every %d-th case): " % args.cli_every
              + ", ".join(f"{kind} {outcome} {n}" for (kind, outcome), n in sorted(cli_counts.items())))
    print(f"slowest decode: {slowest[0]:.2f} s ({slowest[1]})")
    n_bugs = sum(n for o, n in total.items() if o not in fuzz.OK) + sum(
        n for (kind, o), n in cli_counts.items() if o not in fuzz.OK)
    if examples:
        print(f"\n{n_bugs} bug cases; examples (rerun with --strategy NAME --case-seed N):")
        for (strategy, outcome), lines in sorted(examples.items()):
            for line in lines:
                print(f"  {outcome:22} {strategy:20} {line}")
    print("\nOK: no traceback, hang, unbounded allocation or wrong picture" if not n_bugs else f"\nFAILED: {n_bugs} bug cases")
    return 1 if n_bugs else 0


if __name__ == "__main__":
    sys.exit(main())
