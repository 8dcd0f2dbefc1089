"""The exception tree and its status codes."""

from __future__ import annotations

import pickle

import pytest

import ucxrpc
from ucxrpc.errors import StatusCode, error_from_status


def test_codes_are_grpcs() -> None:
    expected = {
        "OK": 0,
        "CANCELLED": 1,
        "UNKNOWN": 2,
        "INVALID_ARGUMENT": 3,
        "DEADLINE_EXCEEDED": 4,
        "NOT_FOUND": 5,
        "ALREADY_EXISTS": 6,
        "PERMISSION_DENIED": 7,
        "RESOURCE_EXHAUSTED": 8,
        "FAILED_PRECONDITION": 9,
        "ABORTED": 10,
        "OUT_OF_RANGE": 11,
        "UNIMPLEMENTED": 12,
        "INTERNAL": 13,
        "UNAVAILABLE": 14,
        "DATA_LOSS": 15,
        "UNAUTHENTICATED": 16,
    }
    assert {c.name: c.value for c in StatusCode} == expected


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (ucxrpc.Cancelled, StatusCode.CANCELLED),
        (ucxrpc.DeadlineExceeded, StatusCode.DEADLINE_EXCEEDED),
        (ucxrpc.MethodNotFound, StatusCode.UNIMPLEMENTED),
        (ucxrpc.InvalidArgument, StatusCode.INVALID_ARGUMENT),
        (ucxrpc.RemoteError, StatusCode.UNKNOWN),
        (ucxrpc.ResourceExhausted, StatusCode.RESOURCE_EXHAUSTED),
        (ucxrpc.Unavailable, StatusCode.UNAVAILABLE),
        (ucxrpc.ConnectionLost, StatusCode.UNAVAILABLE),
        (ucxrpc.Unauthenticated, StatusCode.UNAUTHENTICATED),
        (ucxrpc.ProtocolError, StatusCode.INTERNAL),
    ],
)
def test_subclasses(cls: type[ucxrpc.RpcError], code: StatusCode) -> None:
    err = cls("boom")
    assert isinstance(err, ucxrpc.RpcError)
    assert err.code is code
    assert "boom" in str(err)
    assert isinstance(pickle.loads(pickle.dumps(err)), ucxrpc.RpcError)


def test_deadline_is_a_timeout_error() -> None:
    assert isinstance(ucxrpc.DeadlineExceeded("late"), TimeoutError)
    assert issubclass(ucxrpc.ConnectionLost, ucxrpc.Unavailable)


def test_from_status() -> None:
    err = error_from_status(2, "bad", None, "ValueError", "Traceback ...")
    assert isinstance(err, ucxrpc.RemoteError)
    assert (err.remote_type, err.remote_traceback) == ("ValueError", "Traceback ...")
    assert isinstance(error_from_status(4, "late"), ucxrpc.DeadlineExceeded)
    other = error_from_status(10, "aborted", {"why": 1})
    assert type(other) is ucxrpc.RpcError
    assert other.code is StatusCode.ABORTED and other.details == {"why": 1}
    assert error_from_status(999, "?").code is StatusCode.UNKNOWN


def test_rpc_error_takes_a_code() -> None:
    err = ucxrpc.RpcError(StatusCode.NOT_FOUND, "no such user", {"id": 3})
    assert err.code is StatusCode.NOT_FOUND
    assert str(err) == "[NOT_FOUND] no such user ({'id': 3})"
