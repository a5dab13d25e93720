"""RequestFuture.cancel(): True exactly when this call stopped the request, whoever answers."""

import concurrent.futures

import pytest
from cloche.api.futures import RequestFuture
from cloche.errors import Cancelled


def answered_during_cancel() -> RequestFuture[int]:
    """A future whose cancel is answered at once, as a server answers "cancelled while queued"
    on the reader thread before the client's ``cancel()`` call has returned."""
    box: list[RequestFuture[int]] = []

    def send_cancel() -> None:
        try:
            box[0].set_exception(Cancelled("cancelled while queued"))
        except concurrent.futures.InvalidStateError:
            pass  # what the client's reader does with an answer to a cancelled future

    future: RequestFuture[int] = RequestFuture("run_dataset", on_cancel=send_cancel)
    box.append(future)
    return future


def test_cancel_answered_before_it_returns_still_reports_true():
    future = answered_during_cancel()
    assert future.cancel()
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)


def test_a_mapped_future_cancels_through_to_the_request():
    inner = answered_during_cancel()
    mapped = inner.then(lambda value: value + 1)
    assert mapped.cancel()
    assert inner.cancelled() and mapped.cancelled()


def test_cancel_after_the_answer_reports_false_and_tells_no_one():
    told: list[bool] = []
    future: RequestFuture[int] = RequestFuture("run", on_cancel=lambda: told.append(True))
    future.set_result(3)
    assert not future.cancel()
    assert told == []
    assert future.result() == 3
