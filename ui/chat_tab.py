"""The Chat tab: conversation list, streaming chat, mode and persona pickers, prompt
inspector, feedback, stop and regenerate. Wiring only: every handler calls the chat service.
"""

from __future__ import annotations

import gradio as gr

from personalign.chat import ChatTurn, ReplyUpdate
from personalign.generation import GenerationConfig
from personalign.prompts import Mode
from personalign.services import Services
from ui.errors import shows_errors, user_of

FEEDBACK_LABELS = {1: "Like", -1: "Dislike"}


def chat_messages(turns: list[ChatTurn]) -> list[dict]:
    return [{"role": t.role, "content": t.content} for t in turns]


def generation_config(temperature, max_new_tokens, seed) -> GenerationConfig:
    seed = None if seed in (None, "") or int(seed) < 0 else int(seed)
    return GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=seed)


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
                self.chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot")
                with gr.Row():
                    self.text = gr.Textbox(placeholder="Message", show_label=False, scale=5, elem_id="message",
                                           max_lines=8)
                    self.send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    self.stop = gr.Button("Stop", elem_id="stop")
                    self.regenerate = gr.Button("Regenerate")
                self.status = gr.Markdown(elem_id="chat-status")
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
            return [None, [], gr.update(choices=choices, value=None), [], "", gr.update(), gr.update(), "", status]
        conv = self.s.chat.conversation(user, conversation_id)
        turns = self.s.chat.turns(user, conversation_id)
        prompts = [t.prompt for t in turns if t.prompt]
        feedback = [FEEDBACK_LABELS.get(t.feedback) for t in turns]
        return [conv.id, [t.id for t in turns], gr.update(choices=choices, value=conv.id),
                gr.update(value=chat_messages(turns), feedback_value=feedback), conv.title,
                gr.update(value=conv.persona_id) if conv.persona_id is not None else gr.update(),
                conv.mode, prompts[-1] if prompts else "", status]

    def open_outputs(self) -> list:
        return [self.conversation, self.message_ids, self.conversations, self.chatbot, self.title,
                self.persona, self.mode, self.prompt, self.status]

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
        settings = [self.persona, self.mode, self.temperature, self.max_new_tokens, self.seed]
        streamed = [self.chatbot, self.conversation, self.message_ids, self.prompt, self.status, self.text]
        for trigger in (self.send.click, self.text.submit):
            trigger(shows_errors(self._send), [self.conversation, self.chatbot, self.text, *settings], streamed) \
                .then(shows_errors(self._refresh_list), [self.conversation], [self.conversations])
        self.regenerate.click(shows_errors(self._regenerate), [self.conversation, self.chatbot, *settings], streamed)
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

    def _send(self, request: gr.Request, conversation_id, shown, text, persona_id, mode, temperature, max_new, seed):
        user = user_of(request)
        updates = self.s.chat.send(user, conversation_id, text, persona_id=persona_id, mode=mode,
                                   generation=generation_config(temperature, max_new, seed))
        base = [*shown, {"role": "user", "content": text.strip()}]
        yield from self._stream(user, base, updates)

    def _regenerate(self, request: gr.Request, conversation_id, shown, persona_id, mode, temperature, max_new, seed):
        if conversation_id is None:
            raise gr.Error("Send a message first.")
        user = user_of(request)
        updates = self.s.chat.regenerate(user, conversation_id, persona_id=persona_id, mode=mode,
                                         generation=generation_config(temperature, max_new, seed))
        base = shown[:-1] if shown and shown[-1]["role"] == "assistant" else shown
        yield from self._stream(user, base, updates)

    def _stream(self, user, base, updates):
        update: ReplyUpdate | None = None
        for update in updates:
            if update.done:
                break
            yield [[*base, {"role": "assistant", "content": update.text or "…"}], update.conversation_id,
                   gr.update(), update.prompt, "_generating…_", ""]
        turns = self.s.chat.turns(user, update.conversation_id)
        speed = f" · {update.tokens_per_second:.1f} tokens/s" if update.tokens_per_second else ""
        note = "Stopped; the partial reply was kept." if update.stopped else f"Done{speed}."
        yield [chat_messages(turns), update.conversation_id, [t.id for t in turns], update.prompt, note, ""]

    def _feedback(self, request: gr.Request, message_ids, data: gr.LikeData):
        index = data.index if isinstance(data.index, int) else data.index[0]
        if index >= len(message_ids):
            raise gr.Error("That message is not saved yet.")
        value = {True: 1, False: -1, "Like": 1, "Dislike": -1}.get(data.liked, 0)
        self.s.chat.feedback(user_of(request), message_ids[index], value)
