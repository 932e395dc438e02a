"""`python -m pdserve.cpu_kernels`: build this CPU's kernels into the cache now (make setup runs
it, so the first request does not pay the compile)."""

import sys

from pdserve.cpu_kernels import DISABLE_ENV, kernels

found = kernels()
if found is None:
    print(f"pdserve CPU kernels: not built for this machine (see the log above; {DISABLE_ENV})")
    sys.exit(0)
print(f"pdserve CPU kernels: {found.isa} build ready")
