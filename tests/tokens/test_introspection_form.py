"""The RFC 7662 request body and the in-flight slots, with their fast paths (compiled or not): the same bytes and
the same counts as the slow paths they skip."""

from __future__ import annotations

import asyncio
import urllib.parse

from hypothesis import given
from hypothesis import strategies as st

from verifier.tokens.introspection_client import Slots, _form_body

UNRESERVED = st.text(alphabet="abcXYZ019_.-~", max_size=40)
NEARLY = st.text(alphabet="aZ09_.-~+/= %&\u00e9", max_size=8)  # mostly unreserved, one or two that are not
ANY_TOKEN = st.text(max_size=40)  # anything at all: controls, non-ASCII...


@given(st.one_of(UNRESERVED, NEARLY, ANY_TOKEN))
def test_the_form_body_is_what_quote_plus_writes(token: str) -> None:
    rest = "token_type_hint=access_token"
    assert _form_body(token, rest) == f"token={urllib.parse.quote_plus(token)}&{rest}".encode("ascii")


def test_a_token_that_could_break_out_of_the_form_is_encoded() -> None:
    assert _form_body("a+b/c=", "x") == b"token=a%2Bb%2Fc%3D&x"
    assert _form_body("a&token=b c+é", "x") == b"token=a%26token%3Db+c%2B%C3%A9&x"


async def test_giving_a_slot_back_counts_like_release_and_wakes_a_waiter() -> None:
    slots = Slots(1)
    assert slots.take_now() and not slots.take_now()
    waiter = asyncio.get_running_loop().create_task(slots.acquire())
    await asyncio.sleep(0)  # the waiter queues for the slot
    slots.give_back()  # someone waits: the slot is theirs
    assert await asyncio.wait_for(waiter, 30) is True
    assert slots.locked()
    slots.give_back()  # nobody waits: the count goes back up
    assert not slots.locked()
    assert slots.take_now() and not slots.take_now()  # exactly one slot back
