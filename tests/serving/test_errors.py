"""One error vocabulary (pdserve/errors.py): each class maps to one gRPC status and one HTTP
code, and the kvstore's typed errors reach the wire through it with the status their
clients map back (pdserve/kv/errors.py's ``grpc_code``)."""

from __future__ import annotations

import pytest

from pdserve import errors
from pdserve.kv import errors as kv_errors
from services.kvstore.server import as_pdserve_error


@pytest.mark.parametrize(
    ("exc", "status", "http"),
    [
        (errors.InvalidRequest("x"), "INVALID_ARGUMENT", 400),
        (errors.ModelNotFound("x"), "INVALID_ARGUMENT", 400),
        (errors.Unauthenticated("x"), "UNAUTHENTICATED", 401),
        (errors.NotFound("x"), "NOT_FOUND", 404),
        (errors.AlreadyExists("x"), "ALREADY_EXISTS", 409),
        (errors.Overloaded("x"), "RESOURCE_EXHAUSTED", 429),
        (errors.Cancelled("x"), "CANCELLED", 499),
        (errors.NoWorkers("x"), "UNAVAILABLE", 503),
        (errors.WorkerFailed("x"), "UNAVAILABLE", 503),
        (errors.Unavailable("x"), "UNAVAILABLE", 503),
        (errors.DeadlineExceeded("x"), "DEADLINE_EXCEEDED", 504),
        (errors.DataLoss("x"), "DATA_LOSS", 500),
        (errors.InternalError("x"), "INTERNAL", 500),
    ],
)
def test_each_error_has_one_grpc_status_and_one_http_code(exc, status, http):
    assert errors.grpc_status(exc) == status
    assert errors.http_status(exc)[0] == http


def test_every_kvstore_error_reaches_the_wire_with_the_status_its_clients_expect():
    kinds = [kv_errors.KVError, *_subclasses(kv_errors.KVError)]
    assert len(kinds) >= 8
    for kind in kinds:
        error = as_pdserve_error(kind("boom"))
        assert errors.grpc_status(error) == kind.grpc_code, kind.__name__
        assert error.message == str(kind("boom"))  # as the store said it
        assert kv_errors.BY_GRPC_CODE.get(kind.grpc_code, kv_errors.KVError) in kind.__mro__


def test_quoted_cuts_unbounded_input():
    assert errors.quoted("abc") == "'abc'"
    long = errors.quoted("x" * 10_000)
    assert len(long) < 100 and long.endswith("(10002 chars)")


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
