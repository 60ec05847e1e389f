"""examples/support_bot.py: a support assistant whose memory the dialogue updates, over the OpenAI API.

A live uvicorn server on loopback runs the bot in front of deepsail's real app and engine on the tiny random model;
the official `openai` client and httpx talk to it. The model's words are noise; what is checked is the context it
was given (which the response reports, and whose token count deepsail's usage confirms) and the store.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from deepsail.data import Tokenizer
from deepsail.serve import ServerConfig, load_served
from deepsail.serve.app import uvicorn_config

_spec = importlib.util.spec_from_file_location("support_bot", Path(__file__).parents[1] / "examples" / "support_bot.py")
sb = importlib.util.module_from_spec(_spec)
sys.modules["support_bot"] = sb  # dataclasses look their module up by name
_spec.loader.exec_module(sb)

MAX_LEN = 512  # the debug preset's context
TINY = {"model": "tiny", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Event loop, engine thread and torch share 2 cores in CI: one intra-op thread keeps decode from stalling."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Live:
    """The bot on uvicorn, 127.0.0.1, a port the OS picks, in a background thread."""

    def __init__(self, model_dir: Path, server: ServerConfig, bot) -> None:
        self.app, self.bot = sb.build_app(
            lambda: load_served(model_dir, max_batch_size=4, max_model_len=MAX_LEN), server, bot
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(self.app, server, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started or httpx.get(f"{self.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the bot did not come up"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("memories")


@pytest.fixture(scope="module")
def live(tiny_model_dir, store):
    live = Live(tiny_model_dir, ServerConfig(model_name="tiny"), sb.BotConfig(store=store, max_facts=8))
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(live) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def say(client: openai.OpenAI, user: str, text: str, **kw) -> dict:
    """One turn as a stateless widget sends it (only the new message): the memory is all that links the turns."""
    out = client.chat.completions.create(messages=[{"role": "user", "content": text}], user=user, **TINY, **kw)
    assert out.choices[0].finish_reason in ("stop", "length")
    return out.model_extra["deepsail_memory"] | {"usage": out.usage}


def facts(report: dict) -> dict[str, str]:
    return {f["attribute"]: f["value"] for f in report["facts"]}


# --- the scripted conversation ---------------------------------------------------------------------------------------
def test_a_fact_from_turn_1_is_in_turn_5s_context_and_a_correction_replaces_it(client, live, tiny_model_dir):
    t1 = say(client, "alice", "Hi, my name is Alice Martin and my order number is 12345.")
    assert {(f["attribute"], f["value"], f["turn"]) for f in t1["stored"]} == {
        ("name", "Alice Martin", 1),
        ("order_number", "12345", 1),
    }
    say(client, "alice", "I bought a kettle from you last week.")
    say(client, "alice", "You can reach me on my phone at 555 123 4567.")
    t4 = say(client, "alice", "How long does shipping take?")
    assert t4["faq"][0] == "shipping" and "order_number" not in facts(t4)  # retrieval is selective

    t5 = say(client, "alice", "Where is my order? It has not arrived yet.")
    assert t5["turn"] == 5 and t5["stored"] == []
    assert facts(t5) == {"name": "Alice Martin", "order_number": "12345"}  # not the phone, nor the kettle
    assert "- order number: 12345 (turn 1)" in t5["context"] and "Alice Martin" in t5["context"]
    # ... and that context is what the model read: deepsail counted exactly its tokens as the prompt
    tok = Tokenizer.load(tiny_model_dir)
    seen = [
        {"role": "system", "content": t5["context"]},
        {"role": "user", "content": "Where is my order? It has not arrived yet."},
    ]
    assert t5["usage"].prompt_tokens == len(tok.encode(tok.apply_chat_template(seen, add_generation_prompt=True)))

    t6 = say(client, "alice", "Sorry, actually my order number is 67890")
    assert [(f["attribute"], f["value"]) for f in t6["stored"]] == [("order_number", "67890")]
    t7 = say(client, "alice", "Any news about my order?")
    assert facts(t7)["order_number"] == "67890"
    assert "67890" in t7["context"] and "12345" not in t7["context"]

    stored = httpx.get(f"{live.url}/v1/memory", params={"user": "alice"}).json()
    assert stored["turns"] == 7
    by_key = {(f["subject"], f["attribute"]): f for f in stored["facts"]}
    assert by_key["customer", "order_number"]["value"] == "67890" and by_key["customer", "order_number"]["turn"] == 6
    assert sum(f["attribute"] == "order_number" for f in stored["facts"]) == 1  # replaced, not accumulated
    assert by_key["customer", "phone"]["value"] == "555 123 4567"
    assert by_key["customer", "product"]["value"] == "kettle"


def test_other_corrections_replace_their_fact(client, live):
    say(client, "dan", "My email is dan@old-mail.com and I live in Paris.")
    say(client, "dan", "My email changed to dan@new-mail.org")
    say(client, "dan", "No, I live in Lyon now.")
    t = say(client, "dan", "Which email and city do you have for me?")
    assert facts(t)["email"] == "dan@new-mail.org" and facts(t)["city"] == "Lyon"
    assert "old-mail" not in t["context"] and "Paris" not in t["context"]


def test_two_users_never_see_each_others_facts(client, live):
    say(client, "erin", "My order number is 55555.")
    # X-Conversation-Id is the other way to name a conversation
    frank = client.chat.completions.create(
        messages=[{"role": "user", "content": "My order number is 77777. Where is my order?"}],
        extra_headers={"X-Conversation-Id": "frank"},
        **TINY,
    ).model_extra["deepsail_memory"]
    erin = say(client, "erin", "Where is my order?")
    assert facts(erin) == {"order_number": "55555"} and "77777" not in erin["context"]
    assert facts(frank) == {"order_number": "77777"} and "55555" not in frank["context"]


def test_faq_retrieval_picks_the_entry_the_question_is_about(client):
    for question, entry in [
        ("How do I return a product I don't like?", "returns"),
        ("When will I get my refund?", "refunds"),
        ("What are your opening hours?", "hours"),
        ("My kettle arrived broken, what now?", "damaged"),
    ]:
        report = say(client, "faq-reader", question)
        assert report["faq"][0] == entry, (question, report["faq"])
    returns = say(client, "faq-reader", "Can I still return it?")
    assert "Return any item within 30 days" in returns["context"]


def test_streaming_reports_the_memory_and_commits_it(live, client):
    body = {
        "messages": [{"role": "user", "content": "My order number is 31337, where is it?"}],
        "user": "streamer",
        "stream": True,
        **TINY,
    }
    with httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        report = json.loads(r.headers[sb.MEMORY_HEADER])
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    streamed = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, events[:-1]) if c["choices"]
    )
    assert facts(report) == {"order_number": "31337"} and report["turn"] == 1
    again = say(client, "streamer", "My order number is 31337, where is it?")
    assert again["turn"] == 2  # the streamed turn was committed
    plain = client.chat.completions.create(
        messages=[{"role": "user", "content": "My order number is 31337, where is it?"}], user="streamer", **TINY
    )
    assert streamed == plain.choices[0].message.content  # greedy: same context, same text, streamed or not


def test_the_openai_client_sees_the_header_too(client):
    raw = client.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": "call me Gina"}], user="gina", **TINY
    )
    assert facts(json.loads(raw.headers[sb.MEMORY_HEADER])) == {"name": "Gina"}
    assert raw.parse().choices[0].message.role == "assistant"


# --- bad input: OpenAI's error body, and the memory untouched --------------------------------------------------------
def test_bad_requests_are_4xx_with_a_clear_message(live):
    url = f"{live.url}/v1/chat/completions"
    msg = [{"role": "user", "content": "my order number is 99999"}]

    r = httpx.post(url, json={"messages": msg, **TINY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    assert "X-Conversation-Id" in r.json()["error"]["message"]

    r = httpx.post(url, json={"messages": msg, "user": "../etc/passwd", **TINY})
    assert r.status_code == 400 and "not valid" in r.json()["error"]["message"]

    r = httpx.post(url, json={"messages": msg, "user": "a", **TINY}, headers={"X-Conversation-Id": "b"})
    assert r.status_code == 400 and "disagree" in r.json()["error"]["message"]

    big = [{"role": "user", "content": "my order number is 99999. " + "x" * 5000}]
    r = httpx.post(url, json={"messages": big, "user": "mallory", **TINY})
    assert r.status_code == 400 and "at most 4,000" in r.json()["error"]["message"]

    # deepsail's own validation still answers (and its 400 keeps the bot from storing anything)
    r = httpx.post(url, json={"messages": msg, "user": "mallory", **TINY, "temperature": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(url, json={"messages": msg, "user": "mallory", **TINY, "model": "gpt-4"})
    assert r.status_code == 404
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert httpx.get(f"{live.url}/v1/memory", params={"user": "mallory"}).json()["facts"] == []

    r = httpx.get(f"{live.url}/v1/memory")
    assert r.status_code == 400 and "user=ID" in r.json()["error"]["message"]


def test_the_memory_is_bounded_oldest_out(client, live):
    stored = []
    for turn in [
        "My name is Carol. My order number is A-111. My email is carol@x.io.",
        "My phone number is 555 000 1111. My city is Rome. My address is 1 Via Roma.",
        "My plan is Basic. My account id is C-77. My product is a kettle.",
    ]:
        stored += say(client, "carol", turn)["stored"]
    assert len(stored) == 9
    kept = httpx.get(f"{live.url}/v1/memory", params={"user": "carol"}).json()["facts"]
    assert len(kept) == 8 and "name" not in {f["attribute"] for f in kept}  # stated first, evicted first

    memory = sb.Memory(max_facts=2)
    memory.update([sb.Fact("customer", "name", "A", 1), sb.Fact("customer", "city", "Rome", 1)])
    memory.update([sb.Fact("customer", "name", "B", 2)])  # restating refreshes: now city is the oldest
    evicted = memory.update([sb.Fact("customer", "email", "b@x.io", 3)])
    assert [f.attribute for f in evicted] == ["city"] and [f.value for f in memory.facts.values()] == ["B", "b@x.io"]


def test_forget_deletes_the_conversation(client, live, store):
    say(client, "henry", "My order number is 4242.")
    assert (store / "henry.json").is_file()
    r = httpx.delete(f"{live.url}/v1/memory", params={"user": "henry"})
    assert r.json()["deleted"] is True and not (store / "henry.json").exists()
    assert httpx.get(f"{live.url}/v1/memory", params={"user": "henry"}).json()["facts"] == []


def test_memory_survives_a_restart_and_the_api_key_guards_it(tiny_model_dir, tmp_path):
    server = ServerConfig(model_name="tiny", api_key="sk-test")
    bot = sb.BotConfig(store=tmp_path)
    key = {"Authorization": "Bearer sk-test"}
    first = Live(tiny_model_dir, server, bot)
    try:
        c = openai.OpenAI(base_url=f"{first.url}/v1", api_key="sk-test", max_retries=0, timeout=60)
        say(c, "ivy", "Hi, my name is Ivy and my order number is 12345.")
    finally:
        first.close()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes leave no temporaries

    second = Live(tiny_model_dir, server, bot)  # a new process would see the same: the store is the folder
    try:
        url = f"{second.url}/v1"
        assert httpx.get(f"{url}/memory", params={"user": "ivy"}).status_code == 401
        r = httpx.post(
            f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "my order number is 1"}], **TINY}
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        kept = httpx.get(f"{url}/memory", params={"user": "ivy"}, headers=key).json()
        assert kept["turns"] == 1 and {f["value"] for f in kept["facts"]} == {"Ivy", "12345"}
        c = openai.OpenAI(base_url=url, api_key="sk-test", max_retries=0, timeout=60)
        t = say(c, "ivy", "What about my order?")
        assert t["turn"] == 2 and facts(t)["order_number"] == "12345"
    finally:
        second.close()


def test_the_terminal_chat_is_a_client_of_the_server(live, monkeypatch, capsys):
    lines = iter(["My order number is 2718.", "/memory", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    sb.chat_loop(live.url, "terminal-test", None, max_tokens=4)
    out = capsys.readouterr().out
    assert "memory: order_number=2718" in out and "bot> " in out and '"value": "2718"' in out


# --- the rules and the ranking, without a server ------------------------------------------------------------------
@pytest.mark.parametrize(
    "message, expected",
    [
        (
            "Hi, my name is Alice Martin and my order number is 12345.",
            {"name": "Alice Martin", "order_number": "12345"},
        ),
        ("my order number is not 12345 but 67890", {"order_number": "67890"}),
        ("My email is b@y.com, not a@x.com.", {"email": "b@y.com"}),
        ("no, I live in Lyon now", {"city": "Lyon"}),
        ("I'm Bob, order #4471 please", {"name": "Bob", "order_number": "4471"}),
        ("call me ally", {"name": "Ally"}),
        ("call me at +33 6 12 34 56 78", {"phone": "+33 6 12 34 56 78"}),
        (
            "I bought a kettle last week. It doesn't heat up anymore.",
            {"product": "kettle", "problem": "It doesn't heat up"},
        ),
        ("I'm on the Pro plan", {"plan": "Pro"}),
        ("my email is a@x.com, sorry, my email is b@y.com", {"email": "b@y.com"}),
        ("I'm having a problem with my laptop", {}),  # not a name
        ("What's the status of my order?", {}),  # a question states nothing
    ],
)
def test_extraction_rules(message, expected):
    assert {f.attribute: f.value for f in sb.extract_facts(message, turn=1)} == expected


def test_bm25_ranks_by_rare_shared_terms():
    index = sb.BM25(["the returns policy", "shipping and returns", "opening hours", "shipping shipping rates"])
    assert index.top("return an item", 4) == [0, 1]  # the shorter document first; no shared term, no result
    assert index.top("shipped", 1) == [3]  # the stemmer meets "shipping"; more occurrences rank higher
    assert index.top("hello there", 3) == []
