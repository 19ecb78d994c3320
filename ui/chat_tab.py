"""The Chat tab: conversation list, streaming chat, mode, memory and persona pickers, the
memory meter, prompt inspector, feedback, two answers to pick from, stop and regenerate.
Wiring only: every handler calls the chat service.
"""

from __future__ import annotations

import gradio as gr

from personalign.chat import ChatTurn, ReplyUpdate
from personalign.generation import GenerationConfig
from personalign.memory import MemoryMeter, MemoryPolicy
from personalign.prompts import Mode
from personalign.services import Services
from ui.errors import shows_errors, user_of

FEEDBACK_LABELS = {1: "Like", -1: "Dislike"}


def chat_messages(turns: list[ChatTurn]) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]


def generation_config(temperature, max_new_tokens, seed, strength=0.0) -> GenerationConfig:
    seed = None if seed in (None, "") or int(seed) < 0 else int(seed)
    return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=seed,
                            persona_strength=float(strength or 0))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def meter_text(meter: MemoryMeter | None) -> str:
    """The memory meter line: what the model holds of this chat, against what dense would hold."""
    if meter is None:
        return ""
    line = f"**Memory ({meter.policy})**: {meter.cached_tokens:,} tokens cached · {_size(meter.kv_bytes)} of KV"
    if meter.policy != MemoryPolicy.DENSE.value:
        line += f" · dense would hold {meter.dense_tokens:,} tokens · {_size(meter.dense_kv_bytes)}"
        if meter.reduction:
            line += f" ({meter.reduction:,.1f}× more)"
    return line


class ChatTab:
    """Builds the tab's components inside the current Blocks and wires their events."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.conversation = gr.State(None)  # id of the open conversation, None for a new one
        self.message_ids = gr.State([])  # stored message ids, parallel to the chatbot's messages
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                self.new = gr.Button("New chat", variant="primary")
                self.conversations = gr.Radio(label="Conversations", choices=[], value=None, elem_id="conversations")
                self.title = gr.Textbox(label="Title", placeholder="Rename the open chat")
                with gr.Row():
                    self.rename = gr.Button("Rename", size="sm")
                    self.delete = gr.Button("Delete", size="sm", variant="stop")
            with gr.Column(scale=3):
                with gr.Row():
                    self.persona = gr.Dropdown(label="Persona", choices=[], value=None, scale=2)
                    self.mode = gr.Radio(label="Alignment", choices=[(m.label, m.value) for m in Mode],
                                         value=Mode.NONE.value, scale=3)
                with gr.Row():
                    self.memory = gr.Dropdown(label="Memory", choices=[(p.label, p.value) for p in MemoryPolicy],
                                              value=MemoryPolicy.DENSE.value, scale=2, elem_id="memory-policy")
                    self.strength = gr.Slider(0, 5, value=0, step=0.5, scale=3, elem_id="persona-strength",
                                              label="Persona strength γ (0 = plain decoding; needs dense memory)")
                self.chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot")
                with gr.Row():
                    self.text = gr.Textbox(placeholder="Message", show_label=False, scale=5, elem_id="message",
                                           max_lines=8)
                    self.send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    self.stop = gr.Button("Stop", elem_id="stop")
                    self.regenerate = gr.Button("Regenerate")
                    self.two = gr.Button("Two answers: pick the better", elem_id="two-answers")
                self.status = gr.Markdown(elem_id="chat-status")
                self.meter = gr.Markdown(elem_id="memory-meter")
                with gr.Group(visible=False) as self.picker:
                    with gr.Row():
                        self.answer_a = gr.Textbox(label="Answer A (in the chat now)", interactive=False, lines=4)
                        self.answer_b = gr.Textbox(label="Answer B (new)", interactive=False, lines=4,
                                                   elem_id="answer-b")
                    with gr.Row():
                        self.pick_a = gr.Button("A is better", elem_id="pick-a")
                        self.pick_b = gr.Button("B is better", elem_id="pick-b")
                with gr.Accordion("Prompt inspector: exactly what the model received", open=False):
                    self.prompt = gr.Code(label="Prompt", language=None, interactive=False, wrap_lines=True)
                with gr.Accordion("Generation settings", open=False):
                    self.temperature = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    self.max_new_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens")
                    self.seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        self._wire()

    # Loading ------------------------------------------------------------------------------

    def _conversation_choices(self, user):
        return [(c.title, c.id) for c in self.s.chat.conversations(user)]

    def _open(self, user, conversation_id, status=""):
        """Outputs that show one conversation (or an empty new chat when None)."""
        choices = self._conversation_choices(user)
        if conversation_id is None:
            return [None, [], gr.update(choices=choices, value=None), [], "", gr.update(), gr.update(), "", status,
                    gr.update(), ""]
        conv = self.s.chat.conversation(user, conversation_id)
        turns = self.s.chat.turns(user, conversation_id)
        prompts = [t.prompt for t in turns if t.prompt]
        feedback = [FEEDBACK_LABELS.get(t.feedback) for t in turns]
        return [conv.id, [t.id for t in turns], gr.update(choices=choices, value=conv.id),
                gr.update(value=chat_messages(turns), feedback_value=feedback), conv.title,
                gr.update(value=conv.persona_id) if conv.persona_id is not None else gr.update(),
                conv.mode, prompts[-1] if prompts else "", status, conv.memory, ""]

    def open_outputs(self) -> list:
        return [self.conversation, self.message_ids, self.conversations, self.chatbot, self.title,
                self.persona, self.mode, self.prompt, self.status, self.memory, self.meter]

    def persona_choices(self, request: gr.Request):
        personas = self.s.personas.list(user_of(request))
        return gr.update(choices=[(p.name, p.id) for p in personas])

    def on_load(self, request: gr.Request) -> list:
        user = user_of(request)
        conversations = self.s.chat.conversations(user)
        return [self.persona_choices(request), *self._open(user, conversations[0].id if conversations else None)]

    # Events -------------------------------------------------------------------------------

    def _wire(self) -> None:
        opened = self.open_outputs()
        self.new.click(shows_errors(self._new), None, opened)
        self.conversations.input(shows_errors(self._select), [self.conversations], opened)
        self.rename.click(shows_errors(self._rename), [self.conversation, self.title], opened)
        self.delete.click(shows_errors(self._delete), [self.conversation], opened)
        settings = [self.persona, self.mode, self.temperature, self.max_new_tokens, self.seed, self.strength]
        streamed = [self.chatbot, self.conversation, self.message_ids, self.prompt, self.status, self.text,
                    self.meter]
        for trigger in (self.send.click, self.text.submit):
            trigger(shows_errors(self._send), [self.conversation, self.chatbot, self.text, self.memory, *settings],
                    streamed) \
                .then(shows_errors(self._refresh_list), [self.conversation], [self.conversations])
        self.regenerate.click(shows_errors(self._regenerate), [self.conversation, self.chatbot, *settings], streamed)
        self.two.click(shows_errors(self._two_answers), [self.conversation, self.chatbot, *settings],
                       [self.picker, self.answer_a, self.answer_b, self.status])
        for button, keep_b in ((self.pick_a, False), (self.pick_b, True)):
            button.click(shows_errors(self._pick_handler(keep_b)), [self.conversation, self.answer_b],
                         [*opened, self.picker])
        self.stop.click(shows_errors(self._stop), None, None, queue=False)
        self.chatbot.like(shows_errors(self._feedback), [self.message_ids], None)

    def _new(self, request: gr.Request):
        return self._open(user_of(request), None)

    def _stop(self, request: gr.Request) -> None:
        self.s.chat.stop(user_of(request))

    def _select(self, request: gr.Request, conversation_id):
        return self._open(user_of(request), int(conversation_id) if conversation_id is not None else None)

    def _rename(self, request: gr.Request, conversation_id, title):
        if conversation_id is None:
            raise gr.Error("Open a conversation to rename it.")
        user = user_of(request)
        self.s.chat.rename(user, conversation_id, title or "")
        return self._open(user, conversation_id, "Renamed.")

    def _delete(self, request: gr.Request, conversation_id):
        if conversation_id is None:
            raise gr.Error("Open a conversation to delete it.")
        user = user_of(request)
        self.s.chat.delete(user, conversation_id)
        return self._open(user, None, "Conversation deleted.")

    def _refresh_list(self, request: gr.Request, conversation_id):
        return gr.update(choices=self._conversation_choices(user_of(request)), value=conversation_id)

    def _send(self, request: gr.Request, conversation_id, shown, text, memory, persona_id, mode, temperature,
              max_new, seed, strength):
        user = user_of(request)
        updates = self.s.chat.send(user, conversation_id, text, persona_id=persona_id, mode=mode, memory=memory,
                                   generation=generation_config(temperature, max_new, seed, strength))
        base = [*shown, {"role": "user", "content": text.strip()}]
        yield from self._stream(user, base, updates)

    def _regenerate(self, request: gr.Request, conversation_id, shown, persona_id, mode, temperature, max_new, seed,
                    strength):
        if conversation_id is None:
            raise gr.Error("Send a message first.")
        user = user_of(request)
        updates = self.s.chat.regenerate(user, conversation_id, persona_id=persona_id, mode=mode,
                                         generation=generation_config(temperature, max_new, seed, strength))
        base = shown[:-1] if shown and shown[-1]["role"] == "assistant" else shown
        yield from self._stream(user, base, updates)

    def _stream(self, user, base, updates):
        update: ReplyUpdate | None = None
        for update in updates:
            if update.done:
                break
            yield [[*base, {"role": "assistant", "content": update.text or "…"}], update.conversation_id,
                   gr.update(), update.prompt, f"_{update.status or 'generating…'}_", "", gr.update()]
        turns = self.s.chat.turns(user, update.conversation_id)
        speed = f" · {update.tokens_per_second:.1f} tokens/s" if update.tokens_per_second else ""
        note = "Stopped; the partial reply was kept." if update.stopped else f"Done{speed}."
        yield [chat_messages(turns), update.conversation_id, [t.id for t in turns], update.prompt, note, "",
               meter_text(update.meter)]

    def _two_answers(self, request: gr.Request, conversation_id, shown, persona_id, mode, temperature, max_new, seed,
                     strength):
        if conversation_id is None or not shown or shown[-1]["role"] != "assistant":
            raise gr.Error("Send a message first; then ask for a second answer to compare.")
        current = shown[-1]["content"]
        # Sampled with a fresh seed, so the second answer differs even when the first was greedy or seeded.
        config = generation_config(max(float(temperature), 0.7), max_new, -1, strength)
        text = ""
        for text in self.s.chat.alternative(user_of(request), conversation_id, persona_id=persona_id, mode=mode,
                                            generation=config):
            yield gr.update(visible=True), current, text, "_writing a second answer…_"
        yield gr.update(visible=True), current, text, "Which answer is better? Your pick stays in the chat."

    def _pick_handler(self, keep_b: bool):
        def pick(request: gr.Request, conversation_id, alternative):
            user = user_of(request)
            self.s.chat.pick(user, conversation_id, alternative=alternative, keep_alternative=keep_b)
            return [*self._open(user, conversation_id, f"Kept answer {'B' if keep_b else 'A'}."),
                    gr.update(visible=False)]

        return pick

    def _feedback(self, request: gr.Request, message_ids, data: gr.LikeData):
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(message_ids):
            raise gr.Error("That message is not saved yet.")
        value = {True: 1, False: -1, "Like": 1, "Dislike": -1}.get(data.liked, 0)
        self.s.chat.feedback(user_of(request), message_ids[index], value)
