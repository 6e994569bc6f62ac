"""`bulwark demo` cancels the job it was following when it gives up on it: the demo's data
directory outlives the demo, and a job left running there would be resumed ahead of the next
demo's jobs."""

from __future__ import annotations

from typing import Any

import pytest

from bulwark.commands import demo


class Answer:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def json(self) -> dict[str, Any]:
        return self.body


class StuckJobClient:
    """A service whose job stays running; it records the cancels it is sent."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []

    def get(self, path: str) -> Answer:
        return Answer(
            {
                "status": "running",
                "phase": "training",
                "progress": 0.5,
                "message": "",
                "eta_seconds": None,
                "id": path.rsplit("/", 1)[-1],
                "error": None,
            }
        )

    def post(self, path: str) -> Answer:
        self.cancelled.append(path)
        return Answer({})


def test_a_job_the_demo_gives_up_on_is_cancelled(monkeypatch) -> None:
    monkeypatch.setattr(demo.time, "sleep", lambda _: None)
    client = StuckJobClient()
    with pytest.raises(demo.DemoError, match="did not finish within 0 s"):
        demo._follow(client, {"id": "j1", "status": "queued"}, timeout=0.0)
    assert client.cancelled == ["/v1/jobs/j1/cancel"]


def test_a_job_that_finishes_is_not_cancelled(monkeypatch) -> None:
    client = StuckJobClient()
    monkeypatch.setattr(
        client,
        "get",
        lambda path: Answer(
            {
                "status": "succeeded",
                "phase": "done",
                "progress": 1.0,
                "message": "",
                "eta_seconds": None,
            }
        ),
    )
    assert demo._follow(client, {"id": "j2"}, timeout=5.0)["status"] == "succeeded"
    assert client.cancelled == []
