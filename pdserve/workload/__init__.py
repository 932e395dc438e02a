"""Workloads shared by ``pdserve bench``, ``pdserve sim`` and ``pdserve plan``: the file
format, generators, the packaged Azure trace, and the RESULT.json every run writes."""

from pdserve.workload.format import Request, WorkloadError, load, save

__all__ = ["Request", "WorkloadError", "load", "save"]
