"""How a message's recipients split into destinations, as the relay names them."""

from __future__ import annotations

from smtpq.queue.parts import split
from smtpq.relay.base import DEFAULT_DESTINATION


def test_recipients_keep_their_order_and_original_indexes() -> None:
    rcpts = ["a@x", "b@y", "c@x", "a@x"]  # the same address twice: both go with it
    groups = split(rcpts, (0, 3, 4, 7), {"x": ["a@x", "c@x"], "y": ["b@y"]})
    assert groups == {"x": (["a@x", "c@x", "a@x"], [0, 4, 7]), "y": (["b@y"], [3])}


def test_unnamed_recipients_go_to_the_default_and_the_first_name_wins() -> None:
    groups = split(["a@x", "b@y"], (0, 1), {"x": ["a@x"], "z": ["a@x"]})
    assert groups == {"x": (["a@x"], [0]), DEFAULT_DESTINATION: (["b@y"], [1])}
    assert split(["a@x"], (5,), {}) == {DEFAULT_DESTINATION: (["a@x"], [5])}
