"""The Studio tab: compare answers under different settings, sweep one control and plot what
it does to one measured attribute, save and export the results. Wiring only: every handler
calls the studio service; the shown result is kept as its plain JSON data.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from personalign.preference_space import DIMENSIONS
from personalign.prompts import Mode
from personalign.services import Services
from personalign.studio import (
    ADDED,
    CHANGED,
    DEFAULT_SLIDER_VALUES,
    DEFAULT_STRENGTH_VALUES,
    MAX_SAMPLES,
    MAX_SETTINGS,
    MIN_SETTINGS,
    PERSONA_STRENGTH,
    Comparison,
    Result,
    Setting,
    Sweep,
    attribute_choices,
    from_data,
    to_data,
)
from ui.chat_tab import generation_config
from ui.errors import shows_errors, user_of

NO_OVERRIDE = -1
ROW_NAMES = "ABCD"
STRENGTH_MAX = 6.0  # the slider's range; guidance past this mostly yields noise on small models
DEFAULT_DIMENSION = next(d.index for d in DIMENSIONS if d.positive == "Concise communication style")
DIFF_COLORS = {CHANGED: "#f2b84b", ADDED: "#7cc47f"}
# Gradio spots a Progress default and hands the handler one tracker per event in its place.
PROGRESS = gr.Progress()
PBA_NOTE = ("A slider sweep runs in PBA mode, the mode that puts the sliders in the prompt. PBA renders a value "
            "≥ 0.6 as the positive pole, ≤ 0.4 as the negative pole and anything between as neutral, so "
            "0, .25, .5, .75, 1 give three distinct prompts.")


def _dimension_choices() -> list[tuple[str, int]]:
    return [(f"{d.index}: {d.title}", d.index) for d in DIMENSIONS]


def _variable_choices() -> list[tuple[str, str]]:
    return [("Persona strength γ", PERSONA_STRENGTH)] + [(label, str(i)) for label, i in _dimension_choices()]


def _format_values(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


def default_values(variable: str | None) -> str:
    """The values box text for a sweep variable."""
    return _format_values(DEFAULT_STRENGTH_VALUES if variable == PERSONA_STRENGTH else DEFAULT_SLIDER_VALUES)


def parse_values(text: str | None) -> list[float] | None:
    """Comma- or space-separated numbers; None for a blank box (the defaults)."""
    parts = (text or "").replace(",", " ").split()
    if not parts:
        return None
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise gr.Error(f"Values must be numbers separated by commas; got {text!r}.") from None


def setting_from_row(n: int, label, persona_id, mode, strength, dimension, value, tuned=True) -> Setting:
    """One compare row's fields as a Setting."""
    overrides = {} if dimension in (None, NO_OVERRIDE) else {int(dimension): float(value)}
    return Setting(label=(label or "").strip() or ROW_NAMES[n], persona_id=None if persona_id is None else int(persona_id),
                   mode=mode, overrides=overrides, persona_strength=float(strength or 0), tuned=bool(tuned))


def figures_markdown(comparison: Comparison) -> str:
    """The measured attributes of each answer as a Markdown table."""
    rows = ["| answer | setting | words | grade | formality | sentiment | similarity to first |",
            "|---|---|---|---|---|---|---|"]
    for answer, setting, similarity in zip(comparison.answers, comparison.settings, comparison.similarities):
        a = answer.attributes
        how = setting.describe() + (" · tuned adapter" if answer.tuned else "")
        rows.append(f"| {answer.label} | {how} | {a.get('length', 0):.0f} | "
                    f"{a.get('reading_grade', 0):.1f} | {a.get('formality', 0):+.2f} | {a.get('sentiment', 0):+.2f} | "
                    f"{similarity:.2f} |")
    note = "\n\n_Stopped early: answers after the last shown were not generated._" if comparison.cancelled else ""
    return "\n".join(rows) + f"\n\nSeed {comparison.generation.seed} for every answer.{note}"


def rho_markdown(sweep: Sweep) -> str:
    """The sweep's Spearman ρ and per-value means as Markdown."""
    rho = sweep.rho
    value = "undefined (no variation)" if rho is None else f"**{rho:+.2f}**"
    means = ", ".join(f"{v:g} → {m:.2f}" for v, m in zip(sweep.values, sweep.means) if m is not None)
    stopped = " Stopped early; the points so far are shown." if sweep.cancelled else ""
    stopped += " Answered with the persona's tuned adapter." if sweep.tuned else ""
    return (f"Spearman ρ of {sweep.variable_label} vs {sweep.attribute_label}: {value} over {len(sweep.points)} "
            f"answers (seed {sweep.generation.seed}).  \nMeans: {means or '—'}.{stopped}")


def points_table(sweep: Sweep) -> list[list]:
    """One table row per answer: value, seed, score, text."""
    return [[p.value, p.seed, round(p.score, 4), p.text] for p in sweep.points]


class StudioTab:
    """Builds the tab's components inside the current Blocks and wires their events."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.result = gr.State(None)  # the shown result as plain JSON data (studio.to_data)
        self.question = gr.Textbox(label="Question", lines=2, elem_id="studio-question",
                                   placeholder="One question, answered under every setting")
        with gr.Accordion("Generation settings (shared by every answer)", open=False), gr.Row():
            self.temperature = gr.Slider(0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)")
            self.max_new_tokens = gr.Slider(16, 1024, value=160, step=16, label="Max new tokens")
            self.seed = gr.Number(value=0, precision=0, label="Seed (-1 = random; the same for every answer)")
        with gr.Tabs() as self.views:
            with gr.Tab("Compare", id="compare"):
                self._build_compare()
            with gr.Tab("Sweep", id="sweep"):
                self._build_sweep()
        with gr.Row():
            self.title = gr.Textbox(label="Title", placeholder="Name this result to save it", scale=3)
            self.save = gr.Button("Save", scale=1, elem_id="studio-save")
            self.export_json = gr.Button("Export JSON", scale=1, elem_id="studio-export-json")
            self.export_png = gr.Button("Export PNG", scale=1, elem_id="studio-export-png")
        with gr.Row():
            self.runs = gr.Dropdown(label="Saved runs", choices=[], value=None, scale=3, elem_id="studio-runs")
            self.open = gr.Button("Open", scale=1)
            self.delete = gr.Button("Delete", variant="stop", scale=1)
            self.download = gr.File(label="Download", interactive=False, scale=2, elem_id="studio-download")
        self.status = gr.Markdown(elem_id="studio-status")
        self._wire()

    def _build_compare(self) -> None:
        self.count = gr.Radio(list(range(MIN_SETTINGS, MAX_SETTINGS + 1)), value=MIN_SETTINGS,
                              label="Settings to compare")
        self.setting_rows: list[gr.Row] = []
        self.row_fields: list[list] = []
        for n in range(MAX_SETTINGS):
            with gr.Row(visible=n < MIN_SETTINGS, equal_height=True) as row:
                fields = [
                    gr.Textbox(value=ROW_NAMES[n], label="Label", scale=1, min_width=80),
                    gr.Dropdown(label="Persona", choices=[], value=None, scale=2),
                    gr.Radio([(m.value.upper() if m is not Mode.NONE else "none", m.value) for m in Mode],
                             value=(Mode.NONE if n == 0 else Mode.PBA).value, label="Mode", scale=2),
                    gr.Slider(0, STRENGTH_MAX, value=0, step=0.25, label="Persona strength", scale=2),
                    gr.Dropdown([("No override", NO_OVERRIDE), *_dimension_choices()], value=NO_OVERRIDE,
                                label="Override a dimension (PBA)", filterable=True, scale=3),
                    gr.Slider(0, 1, value=1, step=0.05, label="Override value", scale=2),
                    gr.Checkbox(value=True, label="Persona's tuned adapter", scale=1, min_width=80,
                                info="if it has one"),
                ]
            self.setting_rows.append(row)
            self.row_fields.append(fields)
        with gr.Row():
            self.compare = gr.Button("Compare", variant="primary", elem_id="studio-compare")
            self.compare_stop = gr.Button("Stop")
        with gr.Row(elem_id="studio-answers"):
            self.answers = [gr.HighlightedText(label=ROW_NAMES[n], visible=n < MIN_SETTINGS, color_map=DIFF_COLORS,
                                               show_legend=n == 1, show_inline_category=False, combine_adjacent=True)
                            for n in range(MAX_SETTINGS)]
        self.figures = gr.Markdown(elem_id="studio-figures")

    def _build_sweep(self) -> None:
        gr.Markdown(PBA_NOTE)
        with gr.Row():
            self.sweep_persona = gr.Dropdown(label="Persona", choices=[], value=None, scale=2)
            self.sweep_mode = gr.Radio([("PBA", Mode.PBA.value), ("ICA", Mode.ICA.value)], value=Mode.PBA.value,
                                       label="Mode", scale=1)
            self.variable = gr.Dropdown(_variable_choices(), value=str(DEFAULT_DIMENSION), filterable=True,
                                        label="Control to move (type to search)", scale=4)
        with gr.Row():
            self.values = gr.Textbox(value=default_values(None), label="Values", scale=2)
            self.attribute = gr.Dropdown(attribute_choices(), value="length", label="Measured attribute", scale=3)
            self.samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="Answers per value", scale=2)
            self.base_strength = gr.Slider(0, STRENGTH_MAX, value=0, step=0.25, scale=2,
                                           label="Persona strength (slider sweeps)")
        with gr.Row():
            self.run_sweep = gr.Button("Run sweep", variant="primary", elem_id="studio-sweep")
            self.sweep_stop = gr.Button("Stop")
        self.plot = gr.Plot(label="Attribute vs control", elem_id="studio-plot")
        self.rho = gr.Markdown(elem_id="studio-rho")
        self.points = gr.Dataframe(headers=["value", "seed", "score", "answer"], label="Answers", wrap=True,
                                   interactive=False)

    # Loading ------------------------------------------------------------------------------

    def persona_dropdowns(self) -> list:
        return [fields[1] for fields in self.row_fields] + [self.sweep_persona]

    def persona_choices(self, request: gr.Request, *current) -> list:
        """Fresh persona lists for every persona picker, keeping each choice that still exists."""
        choices = [(p.name, p.id) for p in self.s.personas.list(user_of(request))]
        ids = {i for _, i in choices}
        # A picker still empty keeps its value untouched: the page's own load may be filling it.
        return [gr.update(choices=choices) if v is None or v in ids else gr.update(choices=choices, value=None)
                for v in current]

    def on_load(self, request: gr.Request) -> list:
        choices = [(p.name, p.id) for p in self.s.personas.list(user_of(request))]
        first = choices[0][1] if choices else None
        pickers = [gr.update(choices=choices, value=first) for _ in self.persona_dropdowns()]
        return [*pickers, self._run_choices(user_of(request))]

    def load_outputs(self) -> list:
        return [*self.persona_dropdowns(), self.runs]

    def _run_choices(self, user, value=None):
        runs = self.s.studio.runs(user)
        return gr.update(choices=[(f"{r.title} · {r.kind} · {r.created_at:%Y-%m-%d %H:%M}", r.id) for r in runs],
                         value=value)

    # Showing a result ---------------------------------------------------------------------

    def shown_outputs(self) -> list:
        return [self.views, self.question, *self.answers, self.figures, self.plot, self.rho, self.points,
                self.result, self.status]

    def _show(self, result: Result, status: str) -> list:
        """Every output for one result: the view it belongs to filled, the other left as is."""
        keep = gr.update()
        if isinstance(result, Comparison):
            answers = [gr.update(visible=True, label=a.label, value=d) for a, d in zip(result.answers, result.diffs)]
            answers += [gr.update(visible=n < len(result.settings), value=None, label=ROW_NAMES[n])
                        for n in range(len(answers), MAX_SETTINGS)]
            return [gr.Tabs(selected="compare"), result.question, *answers, figures_markdown(result),
                    keep, keep, keep, to_data(result), status]
        return [gr.Tabs(selected="sweep"), result.question, *([keep] * MAX_SETTINGS), keep,
                self.s.studio.figure(result), rho_markdown(result), points_table(result), to_data(result), status]

    # Events -------------------------------------------------------------------------------

    def _wire(self) -> None:
        shown = self.shown_outputs()
        generation = [self.temperature, self.max_new_tokens, self.seed]
        rows = [f for fields in self.row_fields for f in fields]
        self.count.change(self._count, [self.count], [*self.setting_rows, *self.answers])
        # A set of inputs arrives as one dict by component: the rows are too many for named parameters.
        self.compare.click(shows_errors(self._compare), {self.question, self.count, *generation, *rows}, shown)
        self.variable.input(default_values, [self.variable], [self.values])
        self.run_sweep.click(shows_errors(self._sweep),
                             [self.question, self.sweep_persona, self.sweep_mode, self.variable, self.values,
                              self.attribute, self.samples, self.base_strength, *generation], shown)
        for stop in (self.compare_stop, self.sweep_stop):
            stop.click(shows_errors(self._stop), None, None, queue=False)
        self.save.click(shows_errors(self._save), [self.result, self.title], [self.runs, self.status])
        self.open.click(shows_errors(self._open), [self.runs], shown)
        self.delete.click(shows_errors(self._delete), [self.runs], [self.runs, self.status])
        self.export_json.click(shows_errors(self._export_json), [self.result], [self.download])
        self.export_png.click(shows_errors(self._export_png), [self.result], [self.download])

    def _count(self, count):
        count = int(count)
        return [gr.update(visible=n < count) for n in range(MAX_SETTINGS)] * 2

    def _stop(self, request: gr.Request) -> None:
        self.s.studio.stop(user_of(request))

    def _compare(self, request: gr.Request, values: dict, progress=PROGRESS):
        settings = [setting_from_row(n, *(values[f] for f in fields))
                    for n, fields in enumerate(self.row_fields[:int(values[self.count])])]
        generation = generation_config(values[self.temperature], values[self.max_new_tokens], values[self.seed])
        result = self.s.studio.compare(user_of(request), values[self.question], settings, generation,
                                       progress=lambda done, total, note: progress((done, total), desc=note))
        status = "Stopped early." if result.cancelled else f"Compared {len(result.answers)} settings."
        return self._show(result, status)

    def _sweep(self, request: gr.Request, question, persona_id, mode, variable, values, attribute, samples,
               strength, temperature, max_new, seed, progress=PROGRESS):
        if persona_id is None:
            raise gr.Error("Pick a persona to sweep.")
        if variable is None:
            raise gr.Error("Pick a control to move.")
        result = self.s.studio.sweep(user_of(request), question, int(persona_id), variable, parse_values(values),
                                     attribute, mode, generation_config(temperature, max_new, seed), int(samples),
                                     persona_strength=float(strength or 0),
                                     progress=lambda done, total, note: progress((done, total), desc=note))
        status = "Stopped early." if result.cancelled else f"Swept {len(result.values)} values."
        return self._show(result, status)

    def _current(self, data) -> Result:
        if not data:
            raise gr.Error("Run a comparison or a sweep (or open a saved run) first.")
        return from_data(data)

    def _save(self, request: gr.Request, data, title):
        user = user_of(request)
        run = self.s.studio.save(user, self._current(data), title or "")
        return self._run_choices(user, run.id), f"Saved **{run.title}**."

    def _open(self, request: gr.Request, run_id):
        if run_id is None:
            raise gr.Error("Pick a saved run first.")
        return self._show(self.s.studio.load(user_of(request), int(run_id)), "Opened a saved run.")

    def _delete(self, request: gr.Request, run_id):
        if run_id is None:
            raise gr.Error("Pick a saved run first.")
        user = user_of(request)
        self.s.studio.delete(user, int(run_id))
        return self._run_choices(user), "Deleted the saved run."

    def _export_json(self, request: gr.Request, data):
        result = self._current(data)
        return _write(f"{_kind(result)}.json", self.s.studio.export_json(result).encode("utf-8"))

    def _export_png(self, request: gr.Request, data):
        result = self._current(data)
        return _write(f"{_kind(result)}.png", self.s.studio.export_png(result))


def _kind(result: Result) -> str:
    return "comparison" if isinstance(result, Comparison) else "sweep"


def _write(name: str, content: bytes) -> str:
    out = Path(tempfile.mkdtemp(prefix="studio-")) / name
    out.write_bytes(content)
    return str(out)
