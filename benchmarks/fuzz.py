"""The fuzz harness at length: N mutated cases of every file diffuse reads (tests/fuzzing.py), each of which must
end in a clean load or one DiffuseError, in under a second, without a large allocation.

    python benchmarks/fuzz.py --cases 100000          # about 7,000 a minute on a 2-core CPU
    python benchmarks/fuzz.py --cases 2000 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))
from tests.fuzzing import make_corpus, run_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        corpus = make_corpus(Path(scratch) / "corpus")
        roles = sorted(corpus)
        counts: collections.Counter = collections.Counter()
        bugs = []
        slowest = 0.0
        for i in range(args.cases):
            outcome = run_case(corpus, roles[i % len(roles)], rng, Path(scratch))
            counts[(outcome.role, outcome.result)] += 1
            slowest = max(slowest, outcome.seconds)
            if not outcome.ok:
                bugs.append(outcome)
                print(f"BUG {outcome}", flush=True)
            if (i + 1) % 1000 == 0:
                print(f"{i + 1} cases, {len(bugs)} bugs", flush=True)
    print(f"\n{args.cases} cases, seed {args.seed}: {len(bugs)} bugs; slowest case {slowest:.2f} s")
    for role in roles:
        print(f"  {role:<13}" + ", ".join(f"{r} {n}" for (ro, r), n in sorted(counts.items()) if ro == role))
    sys.exit(1 if bugs else 0)


if __name__ == "__main__":
    main()
