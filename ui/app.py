"""The whole Gradio app: Chat, Persona and Studio tabs over one set of services.

Wiring only: it lays out the tabs and fills them on page load; it knows no model or SQL.
"""

from __future__ import annotations

import gradio as gr

from personalign.services import Services
from ui.chat_tab import ChatTab
from ui.persona_tab import PersonaTab
from ui.studio_tab import StudioTab

TITLE = "Personalign"


def header(services: Services) -> str:
    info = services.model_info
    return (f"# {TITLE}\nPersonalized chat with **{info.get('name', 'a local model')}** "
            f"on {info.get('device', '?')} ({info.get('quantization', '?')}). Build a persona, then chat aligned to it.")


def build_app(services: Services) -> gr.Blocks:
    """The Blocks app; launch it with `launch_app` (or `.launch()` for tests)."""
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(header(services))
        with gr.Tabs():
            with gr.Tab("Chat", id="chat") as chat_tab_button:
                chat = ChatTab(services)
            with gr.Tab("Persona", id="persona"):
                persona = PersonaTab(services)
            with gr.Tab("Studio", id="studio") as studio_tab_button:
                studio = StudioTab(services)
        chat_tab_button.select(chat.persona_choices, None, [chat.persona])
        studio_tab_button.select(studio.persona_choices, studio.persona_dropdowns(), studio.persona_dropdowns())
        demo.load(persona.on_load, None, persona.outputs())
        demo.load(chat.on_load, None, [chat.persona, *chat.open_outputs()])
        demo.load(studio.on_load, None, studio.load_outputs())
    return demo


def launch_app(services: Services, *, auth: bool, host: str | None, port: int | None) -> None:
    """Serve the app; with `auth`, Gradio's login page checks users stored in the database."""
    demo = build_app(services)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=services.accounts.authenticate if auth else None,
        auth_message="Sign in to Personalign" if auth else None,
        show_error=True,
    )
