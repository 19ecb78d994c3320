"""The Persona tab: sliders over the 90 dimensions, demographics, UGC and pairwise editors,
versions, presets, import and export, slider changes inferred from behaviour, and tuning
the model to the persona. Wiring only: every handler calls the persona, profile or tuning service.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from personalign.persona import PairwiseItem, Persona, UGCItem
from personalign.persona_tuning import TuningState
from personalign.personas import PersonaState
from personalign.preference_space import DIMENSIONS, GROUPS, NEUTRAL
from personalign.presets import PRESETS
from personalign.profile import render_profile
from personalign.profiling import Proposal
from personalign.services import Services
from ui.errors import shows_errors, user_of

UGC_HEADERS = ["post", "comment"]
PAIRWISE_HEADERS = ["post", "chosen", "rejected"]
PROPOSAL_HEADERS = ["dimension", "current → proposed", "strength", "supporting items"]
INFER_METHODS = [("Embedding similarity (fast)", "embedding"), ("The chat model labels each item (slower)", "model")]
INFER_HELP = ("Reads this persona's saved posts (UGC) and pairwise choices, and your ratings in chat if learning "
              "is on, and proposes slider changes. Nothing changes until you accept some.")
LEARN_INFO = ("When on, each thumbs-up, thumbs-down or pick of the better answer in a chat with this persona is kept "
              "with it (your question and the rated answers) as behaviour to infer from; when off, nothing new is kept.")


TUNE_HELP = ("Trains a small adapter of the chat model on this persona's saved pairwise choices (and its picks "
             "of the better answer in chat, if learning is on). Chats and studio answers with this persona in ICA or "
             "PBA mode then use it. On a CPU this takes a few minutes, and other replies wait meanwhile.")


def tuning_markdown(state: TuningState | None) -> str:
    """What the tuning section says about a persona: its adapter, and whether it can be tuned now."""
    if state is None:
        return "Save the persona first; tuning reads its saved choices."
    have = f"{state.pairs} pairwise choice{'s' if state.pairs != 1 else ''} saved"
    if state.unavailable is not None:
        return f"Tuning is not available: {state.unavailable}."
    adapter = state.adapter
    if adapter is None:
        need = "" if state.can_tune else f"; tuning needs at least {state.min_pairs}"
        return f"**Not tuned**: replies use the shared model. {have}{need}."
    probe = ""
    if adapter.accuracy_before is not None and adapter.accuracy_after is not None:
        probe = (f"; on {adapter.probe_pairs} held-back choices it preferred the chosen answer "
                 f"{adapter.accuracy_before:.0%} → {adapter.accuracy_after:.0%} of the time")
    head = (f"**Tuned** {adapter.created_at:%Y-%m-%d %H:%M} on {adapter.pairs} choices "
            f"({adapter.steps} training steps{probe}).")
    if adapter.problem is not None:
        return f"{head} **Not in use:** {adapter.problem}. {have}."
    return f"{head} Replies with this persona in ICA or PBA use it. {have} now."


def _rows(table, width: int) -> list[list[str]]:
    """Non-empty rows of an editable table, each cell as stripped text."""
    rows = table.values.tolist() if hasattr(table, "values") else (table or [])
    cleaned = [[("" if c is None else str(c)).strip() for c in row[:width]] for row in rows]
    return [row for row in cleaned if any(row)]


def persona_from_editor(demographics: str, ugc, pairwise, values) -> Persona:
    """Build a Persona from the editor's fields; a half-filled table row is an error, not dropped."""
    return Persona(
        direction=tuple(float(v) for v in values),
        demographics=(demographics or "").strip(),
        ugc=tuple(UGCItem(*row) for row in _rows(ugc, 2)),
        pairwise=tuple(PairwiseItem(*row) for row in _rows(pairwise, 3)),
    )


def editor_values(persona: Persona) -> list:
    """The editor's field values for a persona, in the order of `PersonaTab.fields`."""
    return [
        persona.demographics,
        [[i.post, i.comment] for i in persona.ugc] or [["", ""]],
        [[i.post, i.chosen, i.rejected] for i in persona.pairwise] or [["", "", ""]],
        *persona.direction,
    ]


def proposal_rows(proposal: Proposal | None) -> list[list[str]]:
    """The proposals table: one row per proposed change, strongest first."""
    if proposal is None:
        return []
    return [
        [
            c.dimension.title,
            f"{c.current:.2f} → {c.proposed:.0f} ({c.pole})",
            f"{c.strength:.2f}",
            "; ".join(f"{s.item.summary(48)} ({s.contribution:+.2f})" for s in c.support),
        ]
        for c in proposal.changes
    ]


def proposal_choices(proposal: Proposal | None) -> list[tuple[str, int]]:
    """Checkbox choices for the proposed changes: the pole to move to, by dimension index."""
    if proposal is None:
        return []
    return [(f"{c.pole} ({c.current:.2f} → {c.proposed:.0f})", c.index) for c in proposal.changes]


def proposal_status(proposal: Proposal) -> str:
    items = f"{proposal.item_count} item{'s' if proposal.item_count != 1 else ''}"
    if proposal.chat_items:
        items += f", {proposal.chat_items} from chat ratings"
    base = f"saved version {proposal.base_version_number}"
    if not proposal.changes:
        return f"The behaviour ({items}) agrees with the sliders of {base}; nothing to propose."
    n = len(proposal.changes)
    return (f"{n} proposed change{'s' if n != 1 else ''} from {items}, compared with {base}. "
            "Tick the ones to keep and press **Accept selected**.")


def profile_markdown(values) -> str:
    profile = render_profile([float(v) for v in values])
    return f"**Profile (PBA sees this):** {profile}" if profile else "**Profile:** neutral — move a slider to express a preference."


class PersonaTab:
    """Builds the tab's components inside the current Blocks and wires their events."""

    def __init__(self, services: Services) -> None:
        self.s = services
        with gr.Row():
            self.picker = gr.Dropdown(label="Persona", choices=[], value=None, scale=3, interactive=True)
            self.name = gr.Textbox(label="Name", placeholder="My persona", scale=2)
            self.new = gr.Button("New persona", scale=1)
            self.delete = gr.Button("Delete", variant="stop", scale=1)
        with gr.Row():
            self.preset = gr.Dropdown(label="Start from a preset", choices=list(PRESETS), value=None, scale=3)
            self.apply_preset = gr.Button("Apply preset", scale=1)
            self.filter = gr.Textbox(label="Filter dimensions", placeholder="e.g. concise, science, Murray", scale=3)
        self.profile = gr.Markdown(profile_markdown([NEUTRAL] * len(DIMENSIONS)), elem_id="profile-preview")
        self.sliders: list[gr.Slider] = []
        self.groups: list[gr.Accordion] = []
        for group in GROUPS:
            with gr.Accordion(group, open=group == "Communication") as acc:
                self.groups.append(acc)
                for dim in (d for d in DIMENSIONS if d.group == group):
                    self.sliders.append(
                        gr.Slider(0, 1, value=NEUTRAL, step=0.05, label=dim.title, elem_id=f"dim-{dim.index}")
                    )
        self.demographics = gr.Textbox(label="Demographic description", lines=2, placeholder="Who is this person?")
        self.ugc = gr.Dataframe(headers=UGC_HEADERS, value=[["", ""]], label="Posts they wrote (UGC)",
                                column_count=2, row_count=1, type="array", wrap=True)
        self.pairwise = gr.Dataframe(headers=PAIRWISE_HEADERS, value=[["", "", ""]],
                                     label="Pairwise choices", column_count=3, row_count=1,
                                     type="array", wrap=True)
        with gr.Accordion("Infer from behaviour", open=False, elem_id="infer-section"):
            gr.Markdown(INFER_HELP)
            self.learn = gr.Checkbox(label="Learn from my ratings in chat", value=False, info=LEARN_INFO,
                                     elem_id="learn-from-chat")
            with gr.Row():
                self.method = gr.Radio(INFER_METHODS, value="embedding", label="Method", scale=3)
                self.infer = gr.Button("Infer from behaviour", scale=1, elem_id="infer-profile")
            self.proposals = gr.Dataframe(headers=PROPOSAL_HEADERS, value=[], label="Proposed changes",
                                          interactive=False, wrap=True, column_widths=["24%", "22%", "8%", "46%"],
                                          elem_id="proposals")
            self.accept_choice = gr.CheckboxGroup(choices=[], value=[], label="Changes to accept",
                                                  elem_id="proposal-choices")
            with gr.Row():
                self.accept = gr.Button("Accept selected", variant="primary", elem_id="accept-proposals")
                self.reject = gr.Button("Reject all", elem_id="reject-proposals")
        self.proposal = gr.State(None)  # the shown Proposal: plain numbers and texts, no tensors
        with gr.Accordion("Tune the model to this persona", open=False, elem_id="tune-section"):
            gr.Markdown(TUNE_HELP)
            self.tuning = gr.Markdown(tuning_markdown(None), elem_id="tuning-status")
            with gr.Row():
                self.tune = gr.Button("Tune to my choices", variant="primary", elem_id="tune-persona")
                self.untune = gr.Button("Remove tuning", elem_id="untune-persona")
        with gr.Row():
            self.note = gr.Textbox(label="Version note", placeholder="what changed", scale=3)
            self.save = gr.Button("Save persona", variant="primary", scale=1, elem_id="save-persona")
        with gr.Row():
            self.versions = gr.Dropdown(label="Versions", choices=[], value=None, scale=3)
            self.restore = gr.Button("Restore this version", scale=1)
        with gr.Row():
            self.upload = gr.File(label="Import persona JSON", file_types=[".json"], type="filepath", scale=2,
                                  elem_id="persona-import")
            self.export = gr.DownloadButton("Export JSON", scale=1)
        self.status = gr.Markdown(elem_id="persona-status")
        self.fields = [self.demographics, self.ugc, self.pairwise, *self.sliders]
        self._wire()

    # Loading ------------------------------------------------------------------------------

    def _show(self, user: str | None, state: PersonaState | None, status: str = "") -> list:
        """Every output of a persona change: picker, name, versions, editor fields, profile, status,
        the learning consent, and cleared proposals (they were for the persona as it was)."""
        personas = self.s.personas.list(user)
        choices = [(f"{p.name} (v{p.version_number})", p.id) for p in personas]
        cleared = [None, [], gr.update(choices=[], value=[])]
        if state is None:
            blank = Persona()
            return [gr.update(choices=choices, value=None), "", gr.update(choices=[], value=None),
                    *editor_values(blank), profile_markdown(blank.direction), status, False, *cleared,
                    tuning_markdown(None)]
        versions = [(f"v{v.number} · {v.created_at:%Y-%m-%d %H:%M} · {v.note or '—'}", v.id)
                    for v in self.s.personas.versions(user, state.id)]
        return [gr.update(choices=choices, value=state.id), state.name,
                gr.update(choices=versions, value=state.version_id), *editor_values(state.persona),
                profile_markdown(state.persona.direction), status, self.s.profiles.learning(user, state.id),
                *cleared, tuning_markdown(self.s.tuning.state(user, state.id))]

    def outputs(self) -> list:
        return [self.picker, self.name, self.versions, *self.fields, self.profile, self.status,
                self.learn, self.proposal, self.proposals, self.accept_choice, self.tuning]

    def on_load(self, request: gr.Request) -> list:
        user = user_of(request)
        personas = self.s.personas.list(user)
        state = self.s.personas.load(user, personas[0].id) if personas else None
        return self._show(user, state)

    # Events -------------------------------------------------------------------------------

    def _wire(self) -> None:
        outs = self.outputs()
        self.picker.input(shows_errors(self._pick), [self.picker], outs)
        self.new.click(shows_errors(self._create), [self.name, *self.fields], outs)
        self.save.click(shows_errors(self._save), [self.picker, self.name, self.note, *self.fields], outs)
        self.delete.click(shows_errors(self._delete), [self.picker], outs)
        self.restore.click(shows_errors(self._restore), [self.picker, self.versions], outs)
        self.upload.upload(shows_errors(self._import), [self.upload], outs)
        self.export.click(shows_errors(self._export), [self.picker], [self.export])
        self.apply_preset.click(shows_errors(self._preset), [self.preset], [*self.fields, self.profile])
        self.filter.change(self._filter, [self.filter], [*self.sliders, *self.groups])
        proposal_outs = [self.proposal, self.proposals, self.accept_choice, self.status]
        self.infer.click(shows_errors(self._infer), [self.picker, self.method], proposal_outs)
        self.accept.click(shows_errors(self._accept), [self.picker, self.proposal, self.accept_choice], outs)
        self.reject.click(self._reject, None, proposal_outs)
        # Learning changes which chat picks count, so the tuning section's count follows it.
        self.learn.input(shows_errors(self._learn), [self.picker, self.learn], [self.learn, self.status, self.tuning])
        self.tune.click(shows_errors(self._tune), [self.picker], [self.tuning, self.status])
        self.untune.click(shows_errors(self._untune), [self.picker], [self.tuning, self.status])
        for slider in self.sliders:
            # Gradio passes one argument per slider; the preview reads them all as one direction.
            slider.release(lambda *values: profile_markdown(values), self.sliders, [self.profile])

    def _pick(self, request: gr.Request, persona_id):
        user = user_of(request)
        return self._show(user, self.s.personas.load(user, int(persona_id)) if persona_id is not None else None)

    def _create(self, request: gr.Request, name, demographics, ugc, pairwise, *values):
        user = user_of(request)
        persona = persona_from_editor(demographics, ugc, pairwise, values)
        state = self.s.personas.create(user, (name or "").strip() or "My persona", persona)
        return self._show(user, state, f"Created **{state.name}**.")

    def _save(self, request: gr.Request, persona_id, name, note, demographics, ugc, pairwise, *values):
        user = user_of(request)
        persona = persona_from_editor(demographics, ugc, pairwise, values)
        if persona_id is None:
            state = self.s.personas.create(user, (name or "").strip() or "My persona", persona, note or "created")
        else:
            state = self.s.personas.load(user, int(persona_id))
            if name and name.strip() and name.strip() != state.name:
                self.s.personas.rename(user, state.id, name)
            state = self.s.personas.save(user, state.id, persona, (note or "").strip())
        return self._show(user, state, f"Saved **{state.name}** as version {state.version_number}.")

    def _delete(self, request: gr.Request, persona_id):
        if persona_id is None:
            raise gr.Error("Pick a persona to delete.")
        user = user_of(request)
        self.s.personas.delete(user, int(persona_id))
        return self._show(user, None, "Persona deleted.")

    def _restore(self, request: gr.Request, persona_id, version_id):
        if persona_id is None or version_id is None:
            raise gr.Error("Pick a persona and one of its versions first.")
        user = user_of(request)
        state = self.s.personas.restore(user, int(persona_id), int(version_id))
        return self._show(user, state, f"Restored as version {state.version_number}; later versions are kept.")

    def _import(self, request: gr.Request, path):
        user = user_of(request)
        data = Path(path).read_bytes()
        state = self.s.personas.import_json(user, Path(path).stem[:100] or "Imported persona", data)
        return self._show(user, state, f"Imported **{state.name}**.")

    def _export(self, request: gr.Request, persona_id):
        if persona_id is None:
            raise gr.Error("Pick a persona to export.")
        user = user_of(request)
        state = self.s.personas.load(user, int(persona_id))
        out = Path(tempfile.mkdtemp(prefix="persona-")) / f"{_file_stem(state.name)}.json"
        out.write_text(self.s.personas.export_json(user, state.id), encoding="utf-8")
        return str(out)

    def _preset(self, name):
        if name not in PRESETS:
            raise gr.Error("Pick a preset first.")
        persona = PRESETS[name]
        return [*editor_values(persona), profile_markdown(persona.direction)]

    # Gradio injects a tracker through the gr.Progress() default (its documented idiom).
    def _infer(self, request: gr.Request, persona_id, method, progress=gr.Progress()):  # noqa: B008
        if persona_id is None:
            raise gr.Error("Pick or save a persona first: inference reads its saved version.")
        user = user_of(request)

        def report(done: int, total: int) -> None:
            progress((done, total), desc="Reading behaviour", unit="items")

        proposal = self.s.profiles.propose(user, int(persona_id), method or "embedding", progress=report)
        return [proposal, proposal_rows(proposal), gr.update(choices=proposal_choices(proposal), value=[]),
                proposal_status(proposal)]

    def _accept(self, request: gr.Request, persona_id, proposal, selected):
        if persona_id is None or proposal is None:
            raise gr.Error("Infer changes for a persona first.")
        user = user_of(request)
        chosen = [int(i) for i in selected or []]
        state = self.s.profiles.accept(user, int(persona_id), proposal.base_version_id, chosen, proposal)
        n = len(chosen)
        return self._show(user, state, f"Accepted {n} change{'s' if n != 1 else ''} as version {state.version_number}.")

    def _reject(self):
        return [None, [], gr.update(choices=[], value=[]), "Proposals dismissed; nothing was changed."]

    def _learn(self, request: gr.Request, persona_id, enabled):
        if persona_id is None:
            return [False, "Save the persona first; learning from chat ratings is set per persona.",
                    tuning_markdown(None)]
        user = user_of(request)
        on = self.s.profiles.set_learning(user, int(persona_id), bool(enabled))
        return [on, "Learning from your chat ratings is **on** for this persona." if on
                else "Learning from chat ratings is **off**: no new ratings are kept for this persona.",
                tuning_markdown(self.s.tuning.state(user, int(persona_id)))]

    # Gradio injects a tracker through the gr.Progress() default (its documented idiom).
    def _tune(self, request: gr.Request, persona_id, progress=gr.Progress()):  # noqa: B008
        if persona_id is None:
            raise gr.Error("Pick or save a persona first: tuning reads its saved choices.")

        def report(done: int, total: int, note: str) -> None:
            progress((done, total), desc=note, unit="steps")

        state = self.s.tuning.tune(user_of(request), int(persona_id), progress=report)
        return [tuning_markdown(state), "Tuned: replies with this persona now use its adapter."]

    def _untune(self, request: gr.Request, persona_id):
        if persona_id is None:
            raise gr.Error("Pick a persona first.")
        state = self.s.tuning.remove(user_of(request), int(persona_id))
        return [tuning_markdown(state), "Tuning removed: replies with this persona use the shared model."]

    def _filter(self, query):
        hits = [d.matches(query or "") for d in DIMENSIONS]
        expand = {"open": True} if query else {}
        groups = [gr.update(visible=any(h for d, h in zip(DIMENSIONS, hits) if d.group == g), **expand)
                  for g in GROUPS]
        return [gr.update(visible=h) for h in hits] + groups


def _file_stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "persona"
