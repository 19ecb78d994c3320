import itertools
import threading

import pytest

from personalign.errors import NotFoundError, UserError
from personalign.generation import GenerationConfig
from personalign.persona import Persona
from personalign.prompts import Mode, build_messages

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)


def consume(updates):
    updates = list(updates)
    assert updates[-1].done
    return updates


def test_send_streams_and_stores_the_exact_prompt(services):
    persona = services.personas.create(None, "Kid", Persona().with_values({0: 1.0, 16: 1.0}))
    updates = consume(services.chat.send(None, None, "  Why is the sky blue?  ", persona_id=persona.id, mode="pba",
                                         generation=GREEDY))
    texts = [u.text for u in updates[:-1] if u.text]
    assert len(texts) >= 2 and all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative stream
    final = updates[-1]
    assert len(texts) <= final.new_tokens <= GREEDY.max_new_tokens  # at most one update per token
    turns = services.chat.turns(None, final.conversation_id)
    assert [(t.role, t.content) for t in turns] == [("user", "Why is the sky blue?"), ("assistant", final.text)]
    expected = build_messages("pba", persona.persona, [], "Why is the sky blue?")
    assert "Young, Concise communication style" in turns[1].prompt
    assert turns[1].prompt == final.prompt == services.chat._engine.render(expected)
    assert services.chat.conversation(None, final.conversation_id).title == "Why is the sky blue?"


def test_multi_turn_sends_history(services):
    first = consume(services.chat.send(None, None, "Hello", persona_id=None, mode="none", generation=GREEDY))[-1]
    second = consume(services.chat.send(None, first.conversation_id, "And again", persona_id=None, mode="none",
                                        generation=GREEDY))[-1]
    assert "Hello" in second.prompt and first.text in second.prompt
    assert len(services.chat.turns(None, first.conversation_id)) == 4


def test_stop_keeps_the_partial_reply(services):
    long = GenerationConfig(max_new_tokens=200, temperature=0.0)
    stream = services.chat.send(None, None, "Tell me a story", persona_id=None, mode="none", generation=long)
    for update in stream:
        if len(update.text) > 3:
            services.chat.stop(None)
            break
    rest = list(stream)
    assert rest[-1].done and rest[-1].stopped
    turns = services.chat.turns(None, rest[-1].conversation_id)
    assert turns[-1].role == "assistant" and turns[-1].content == rest[-1].text


def test_abandoned_stream_releases_the_model_and_keeps_the_text(services):
    stream = services.chat.send(None, None, "Hi", persona_id=None, mode="none", generation=GREEDY)
    partial = [next(stream).text for _ in range(3)][-1]
    stream.close()
    conversation = services.chat.conversations(None)[0]
    assert services.chat.turns(None, conversation.id)[-1].content == partial
    consume(services.chat.send(None, conversation.id, "Still there?", persona_id=None, mode="none",
                               generation=GREEDY))


def test_regenerate_replaces_the_last_reply(services):
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=1)
    first = consume(services.chat.send(None, None, "Hi", persona_id=None, mode="none", generation=sampled))[-1]
    again = consume(services.chat.regenerate(None, first.conversation_id, persona_id=None, mode="none",
                                             generation=GenerationConfig(max_new_tokens=8, temperature=1.0, seed=2)))
    turns = services.chat.turns(None, first.conversation_id)
    assert [t.role for t in turns] == ["user", "assistant"]
    assert turns[-1].content == again[-1].text


def test_feedback_is_stored_per_message(services):
    final = consume(services.chat.send(None, None, "Hi", persona_id=None, mode="none", generation=GREEDY))[-1]
    services.chat.feedback(None, final.assistant_message_id, -1)
    assert services.chat.turns(None, final.conversation_id)[-1].feedback == -1
    services.chat.feedback(None, final.assistant_message_id, 0)
    assert services.chat.turns(None, final.conversation_id)[-1].feedback == 0


@pytest.mark.parametrize("text, message", [("   ", "Type a message"), ("x" * 8001, "limit")])
def test_bad_messages_are_refused_before_anything_is_stored(services, text, message):
    with pytest.raises(UserError, match=message):
        services.chat.send(None, None, text, persona_id=None, mode="none", generation=GREEDY)
    assert services.chat.conversations(None) == []


def test_persona_modes_need_a_persona(services):
    with pytest.raises(UserError, match="needs a persona"):
        services.chat.send(None, None, "Hi", persona_id=None, mode="ica", generation=GREEDY)


def test_long_history_is_trimmed_to_fit_the_context(services):
    conversation = services.chat.new_conversation(None, "long")
    for _ in range(6):  # the tiny model's context is 512 byte-tokens
        consume(services.chat.send(None, conversation.id, "y" * 150, persona_id=None, mode="none",
                                   generation=GREEDY))
    prompt = services.chat.turns(None, conversation.id)[-1].prompt
    assert services.chat._engine.count_tokens([{"role": "user", "content": prompt}]) <= 512
    assert len(services.chat.turns(None, conversation.id)) == 12  # nothing stored was dropped


@pytest.mark.parametrize("turns", [0, 1, 3, 40])
def test_trimming_keeps_the_most_recent_turns_that_fit(services, turns):
    """The bisection finds what dropping one oldest turn at a time would: the longest recent stretch."""
    chat = services.chat
    history = []
    for i in range(turns):
        history += [{"role": "user", "content": f"question {i} " + "y" * (5 + 7 * i % 30)},
                    {"role": "assistant", "content": f"answer {i}"}]
    history = history[:-1] if turns == 3 else history  # a history may end on a user message
    budget = chat._engine.max_context() - 16
    drop = next(d for d in range(0, len(history) + 2, 2)
                if chat._engine.count_tokens(build_messages("none", None, history[d:], "now?")) <= budget)
    messages, _ = chat._messages(None, history, "now?", None, Mode.NONE, 16)
    assert messages == build_messages("none", None, history[drop:], "now?")
    assert turns < 40 or 0 < drop < len(history)  # the long one is cut inside


def test_conversations_are_private(services):
    services.accounts.create_user("alice", "password-a")
    services.accounts.create_user("bob", "password-b")
    final = consume(services.chat.send("alice", None, "Secret", persona_id=None, mode="none", generation=GREEDY))[-1]
    assert services.chat.conversations("bob") == []
    with pytest.raises(NotFoundError):
        services.chat.turns("bob", final.conversation_id)
    with pytest.raises(NotFoundError):
        services.chat.send("bob", final.conversation_id, "Hi", persona_id=None, mode="none", generation=GREEDY)
    with pytest.raises(NotFoundError):
        services.chat.feedback("bob", final.assistant_message_id, 1)
    with pytest.raises(NotFoundError):
        services.chat.delete("bob", final.conversation_id)
    assert len(services.chat.turns("alice", final.conversation_id)) == 2


def test_two_users_replies_are_not_interleaved(services):
    services.accounts.create_user("alice", "password-a")
    services.accounts.create_user("bob", "password-b")
    solo = consume(services.chat.send(None, None, "Same question", persona_id=None, mode="none",
                                      generation=GREEDY))[-1].text
    results = {}

    def run(user):
        results[user] = consume(services.chat.send(user, None, "Same question", persona_id=None, mode="none",
                                                   generation=GREEDY))[-1].text

    threads = [threading.Thread(target=run, args=(u,)) for u in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {"alice": solo, "bob": solo}


def test_replies_finishing_together_keep_their_own_stats(services):
    """Bob's whole reply runs while Alice's is being stored: her figures must still be her own."""
    services.accounts.create_user("alice", "password-a")
    services.accounts.create_user("bob", "password-b")
    requests = {"alice": ("Tell me a long story about the sea, please.", GREEDY),
                "bob": ("Hi", GenerationConfig(max_new_tokens=3, temperature=0.0))}

    def send(user):
        text, generation = requests[user]
        return consume(services.chat.send(user, None, text, persona_id=None, mode="none", generation=generation))[-1]

    solo = {user: send(user).meter for user in requests}
    assert solo["alice"] != solo["bob"]

    store = services.chat._store_reply
    bob_done = []

    def store_then_let_bob_finish(user, *args):
        if user == "alice" and not bob_done:
            bob_done.append(send("bob"))
        return store(user, *args)

    services.chat._store_reply = store_then_let_bob_finish
    alice = send("alice")
    assert alice.meter == solo["alice"] and bob_done[0].meter == solo["bob"]
