"""Where the bitwise pins are computed (tests/test_plan_pins.py, tests/test_trajectory_pins.py).

The pins hash every bit of plans and trajectories. numpy's float64 ufuncs (exp, log, power, cos, ...) have
AVX-512 loops whose results differ from its AVX2 loops in the last bits, and OpenBLAS picks its kernels by CPU:
numpy promises neither bitwise equality across SIMD targets nor one BLAS summation order. The pins were computed
with numpy's AVX2 (X86_V3) loops and OpenBLAS's Haswell kernels. Measured on an AVX-512 machine (Sapphire
Rapids, numpy 2.4.5 and 2.4.6): all 18 pins fail as they stand, 17 pass with numpy's AVX-512 loops disabled, all
18 with OpenBLAS's Haswell kernels too (the one left, the episode-budget preset, reads its fading correlation
from a Bessel integral computed as a matrix-vector product). So where numpy dispatches beyond AVX2,
:func:`digests` computes the pins in a child process with those two settings: the same code on the same inputs,
with numpy's and OpenBLAS's own code paths fixed to the pinned ones. Everywhere else it computes them in-process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

#: numpy's dispatch targets above AVX2 (numpy 2.x names, and the AVX512_* names of numpy < 2.3)
_AVX2 = "X86_V3"


def beyond_avx2() -> list[str]:
    """numpy's dispatched targets above AVX2 that this CPU has (empty: numpy runs its AVX2 loops or less)."""
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    return [f for f in __cpu_dispatch__ if __cpu_features__.get(f) and (f == "X86_V4" or f.startswith("AVX512"))]


def digests(module_path: str, function: str = "all_digests") -> dict:
    """``function()`` of the test module at ``module_path`` (a dict of JSON-able keys and digests), in a child
    process with numpy's AVX2 loops and OpenBLAS's Haswell kernels where this CPU would use others."""
    beyond = beyond_avx2()
    if not beyond:
        import runpy

        return runpy.run_path(module_path)[function]()
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES=",".join(beyond), OPENBLAS_CORETYPE="Haswell")
    tests = os.path.dirname(os.path.abspath(module_path))
    code = ("import json, runpy, sys; sys.path[:0] = sys.argv[2:]; "
            f"print(json.dumps(runpy.run_path(sys.argv[1])[{function!r}]()))")
    done = subprocess.run([sys.executable, "-c", code, module_path, tests, os.path.dirname(tests)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"computing the pins in a child process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
