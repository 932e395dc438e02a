"""`python -m pdserve.cpu_kernels`: build this CPU's kernels and decode stack into the cache now
(make setup runs it, so the first request does not pay the compile)."""

import sys

from pdserve.cpu_kernels import DISABLE_ENV, decode_stack_class, kernels

found = kernels()
if found is None:
    print(f"pdserve CPU kernels: not built for this machine (see the log above; {DISABLE_ENV})")
    sys.exit(0)
stack = "with" if decode_stack_class() is not None else "without (see the log above)"
print(f"pdserve CPU kernels: {found.isa} build ready, {stack} the decode stack")
