"""Decision time of the exact SiftMoE decoding solver against brute-force references.

    python bench/bench_siftmoe.py [--batch 256] [--n-single 200] [--budget-scale 0.5] [--seed 0]

For each (E, K) in (8, 1), (8, 2), (32, 4) it times, in the same run and on the same env-like random
instances (baselines.instances.random_decode_instances):

* the solver, one instance per call ("single": unbatched arrays, which take the pure-Python
  depth-first search) and B instances per call ("batched": the vectorised level-wise search, time / B);
* the reference:
  - E <= 16: brute force over all 2^E executed masks (vectorised numpy, one call per instance for
    "single", one call for the whole batch for "batched");
  - E = 32: 2^32 masks per instance cannot be enumerated, so two references are reported:
    (a) the exact (E+1)^K slot-assignment enumeration (33^4 = 1.19M assignments, vectorised) measured
        on a subsample of instances, and (b) the 2^E brute force *extrapolated* from the measured time
        of a 2^16-mask slice (per-mask time x 2^32).
Ratios are reference time / solver time (> 1: the solver is faster).  Every instance the reference
solved is also checked for the same optimal energy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baselines.instances import random_decode_instances  # noqa: E402
from baselines.reference import all_masks, assignment_decode, brute_force_decode_batch  # noqa: E402
from baselines.siftmoe import solve_decode_full  # noqa: E402


def _time(fn, repeat=3):
    best = np.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _fmt(seconds):
    if seconds >= 1.0:
        return f"{seconds:8.2f} s "
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds * 1e6:8.1f} us"


def bench(E, K, args, rng):
    inst = random_decode_instances(rng, args.batch, E, K, budget_scale=args.budget_scale)
    e, f, d, b = inst["energy"], inst["feasible"], inst["deviation_table"], inst["budget"]
    ns = min(args.n_single, args.batch)

    def solver_single():
        return [solve_decode_full(e[i], f[i], d[i], b[i]).energy for i in range(ns)]

    t_single, single_e = _time(solver_single)
    t_single /= ns
    t_batch, sol = _time(lambda: solve_decode_full(e, f, d, b))
    t_batch /= args.batch
    assert np.allclose(np.array(single_e), sol.energy[:ns], rtol=0, atol=0), "single and batched paths disagree"

    rows = []
    if E <= 16:
        ref_name = f"brute force 2^{E}"
        nr = min(ns, 64)

        def ref_single():
            return [brute_force_decode_batch(e[i:i + 1], f[i:i + 1], d[i:i + 1], b[i:i + 1])[0][0]
                    for i in range(nr)]

        tr_single, ref_e = _time(ref_single)
        tr_single /= nr
        tr_batch, (ref_eb, _) = _time(lambda: brute_force_decode_batch(e, f, d, b))
        tr_batch /= args.batch
        ok = np.allclose(ref_eb, sol.energy, rtol=1e-9, atol=1e-12) and np.allclose(ref_e, sol.energy[:nr],
                                                                                       rtol=1e-9, atol=1e-12)
        rows.append((ref_name, tr_single, tr_batch, f"{args.batch}/{args.batch}", ok))
    else:
        nr = args.n_assign
        ref_name = f"(E+1)^K = {(E + 1) ** K:,} assignments"
        t0 = time.perf_counter()
        ref = [assignment_decode(e[i], f[i], d[i], b[i]) for i in range(nr)]
        tr = (time.perf_counter() - t0) / nr
        ok = np.allclose([r[0] for r in ref], sol.energy[:nr], rtol=1e-9, atol=1e-12)
        rows.append((ref_name, tr, tr, f"{nr}/{args.batch}", ok))
        # 2^E extrapolated from a 2^16-mask slice of one instance
        sl = all_masks(16)
        masks = np.zeros((sl.shape[0], E), dtype=bool)
        masks[:, :16] = sl
        ts, _ = _time(lambda: brute_force_decode_batch(e[:1], f[:1], d[:1], b[:1], masks=masks))
        tr2 = ts / masks.shape[0] * 2.0 ** E
        rows.append((f"brute force 2^{E} (extrapolated from 2^16)", tr2, tr2, "0 (extrapolated)", None))

    print(f"\n(E, K) = ({E}, {K}); B = {args.batch}; budget = {args.budget_scale} x skip-all deviation; "
          f"mean |A| = {sol.mask.sum(1).mean():.2f}, budget met on {sol.budget_met.mean():.0%}")
    print(f"  SiftMoE solver     single {_fmt(t_single)} / token-layer   batched {_fmt(t_batch)} / token-layer")
    for name, trs, trb, n_checked, ok in rows:
        agree = "n/a" if ok is None else ("yes" if ok else "NO")
        print(f"  ref: {name}")
        print(f"                     single {_fmt(trs)} / token-layer   batched {_fmt(trb)} / token-layer")
        print(f"        ratio ref/solver: single {trs / t_single:10.1f}x   batched {trb / t_batch:10.1f}x   "
              f"(same optimum on {n_checked} checked: {agree})")
        if ok is False:
            raise SystemExit("solver disagrees with the reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--n-single", type=int, default=200, help="instances timed one per call")
    ap.add_argument("--n-assign", type=int, default=3, help="E=32 instances solved by (E+1)^K enumeration")
    ap.add_argument("--budget-scale", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default="8:1,8:2,32:4", help="comma-separated E:K pairs")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print("SiftMoE exact decoding solver benchmark (numpy", np.__version__, ")")
    for case in args.cases.split(","):
        E, K = (int(x) for x in case.split(":"))
        bench(E, K, args, rng)


if __name__ == "__main__":
    main()
