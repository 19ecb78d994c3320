"""A long chat through the app's own services: reopening it, its memory meter, and one more turn.

    PYTHONPATH=. python benchmarks/long_chat.py [--model embedded] [--adapter DIR] [--device auto]
        [--quantize auto] [--turns 10,500,5000] [--repeats 3] [--max-new-tokens 16] [--threads N]
        [--data ../shared/data/alignx/p_soups_student_phd.json] [--skip-dense]

What issue 3 asks of a long chat in the app: "reopening a 5,000-turn chat resumes at once,
without re-reading the history"; KV bytes after 1,000 utterances ">= 18x smaller than dense,
and flat as turns grow"; a turn at turn 1,000 ">= 4x faster than dense recomputation, and
within 1.2x of turn 10".

Each chat's stored history is N turns of real chat text: the P-Soups prompts of ``--data`` (an
AlignX file) as the user's messages and their chosen replies as the assistant's, in file order,
repeated when N asks for more turns than the file has. Everything goes through ``ChatService``
over a scratch SQLite database, as the app runs it; ``build_services`` is called afresh to stand
for the app restarting (no memory in RAM), over the same database, memory files and model.

Per N, a streaming-dialogue chat is measured three ways, each a real ``send`` (greedy, up to
``--max-new-tokens``): *rebuilt*, no memory file yet, so the memory is replayed from the stored
messages before the reply starts (what a lost or stale file costs); *reopened*, after a restart,
from the file the rebuilt turn saved; *live*, with the memory in RAM. Times are to the reply's
first token, to its last, and to the end of the turn (the memory compressed; its file is written
after, by the store's writer thread). The live turns
and a dense chat of the same history (which re-reads the history, trimmed to the context, every
turn) run interleaved, ``--repeats`` rounds over every N, so their ratios compare like moments.
The meter rows are the app's own memory meter after the last turn.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.memory_recall import _ints, _kib, _table

logger = logging.getLogger("long_chat")

DEFAULT_DATA = Path("../shared/data/alignx/p_soups_student_phd.json")
STREAMING = "streaming-dialogue"
DENSE = "dense"


def chat_pairs(path: Path) -> list[tuple[str, str]]:
    """The distinct (user message, reply) pairs of an AlignX file: its prompts and chosen replies.

    Every record gives its own pair, then those of its pairwise feedback, in file order.
    """
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read the chat text from {path}: {exc}") from exc
    pairs: dict[tuple[str, str], None] = {}
    for record in records if isinstance(records, list) else []:
        items = [record, *record.get("Pair-wise Comparative Feedback", [])] if isinstance(record, dict) else []
        for item in items:
            prompt, chosen = item.get("prompt"), item.get("chosen")
            if isinstance(prompt, str) and isinstance(chosen, str) and prompt.strip() and chosen.strip():
                pairs[(prompt.strip(), chosen.strip())] = None
    if not pairs:
        raise SystemExit(f"{path} holds no prompt and chosen reply to build a chat from")
    return list(pairs)


def cycled(pairs: Sequence[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """The first ``count`` pairs of ``pairs`` repeated end to end."""
    return [pairs[i % len(pairs)] for i in range(count)]


@dataclass
class Timing:
    """One ``send``, timed from its call: seconds to the first token, the last one, the turn's end."""

    first_token_s: float
    last_token_s: float
    done_s: float
    reply: str
    new_tokens: int  # the tokens the model generated, as the engine counted them
    rebuild_updates: int
    meter: Any  # MemoryMeter of the turn (None for a reply that stored nothing)

    @property
    def step_s(self) -> float | None:
        """Seconds per generated token after the first (one decode step each; None for one token).

        Unlike the time to the last token, it does not depend on how long the reply ran.
        """
        return (self.last_token_s - self.first_token_s) / (self.new_tokens - 1) if self.new_tokens > 1 else None


def timed_send(chat: Any, conversation_id: int, text: str, generation: Any) -> Timing:
    """Send ``text`` and drain the reply, noting when its first and last tokens and its end arrive."""
    started = time.perf_counter()
    first = last = None
    rebuilds = 0
    final = None
    for update in chat.send(None, conversation_id, text, persona_id=None, mode="none", generation=generation):
        now = time.perf_counter() - started
        if update.done:
            final = update
            break
        if update.status:
            rebuilds += 1
            if rebuilds % 50 == 0:  # the service reports every 10 turns: show progress every 500
                logger.info("%s (%.0f s)", update.status, now)
        elif update.text:
            first = now if first is None else first
            last = now
    done = time.perf_counter() - started
    if final is None or first is None:
        raise RuntimeError(f"conversation {conversation_id}: the reply ended without a token")
    return Timing(first, last, done, final.text, final.new_tokens or 0, rebuilds, final.meter)


def seed_history(db: Any, conversation_id: int, turns: Sequence[tuple[str, str]]) -> None:
    """Store ``turns`` as the chat's history, as if they had been sent and answered."""
    import storage

    with db.session() as s:
        user_id = storage.get_or_create_local_user(session=s).id
        for question, reply in turns:
            storage.add_message(session=s, user_id=user_id, conversation_id=conversation_id, role="user",
                                content=question)
            storage.add_message(session=s, user_id=user_id, conversation_id=conversation_id, role="assistant",
                                content=reply, mode="none")


@dataclass
class ChatRun:
    """What was measured for the chats of one length."""

    turns: int
    rebuilt: Timing | None = None
    reopened: Timing | None = None
    file_bytes: int = 0
    live: list[Timing] = field(default_factory=list)
    dense: list[Timing] = field(default_factory=list)


def run(db: Any, services_for: Any, lengths: Sequence[int], pairs: Sequence[tuple[str, str]], generation: Any,
        repeats: int, dense: bool) -> list[ChatRun]:
    """Seed one streaming-dialogue chat (and a dense twin) per length, then time rebuilt, reopened
    and live turns; ``services_for()`` builds the services afresh, as an app restart would."""
    runs = [ChatRun(n) for n in lengths]
    chat = services_for().chat
    chats: dict[tuple[int, str], int] = {}
    for r in runs:
        for policy in (STREAMING, DENSE) if dense else (STREAMING,):
            conversation = chat.new_conversation(None, f"{r.turns} turns, {policy}", memory=policy)
            logger.info("storing a %s chat of %d turns", policy, r.turns)
            seed_history(db, conversation.id, pairs[:r.turns])
            chats[(r.turns, policy)] = conversation.id
    asks = itertools.cycle([question for question, _ in pairs])  # the prompts again, from the start
    memory_root = db.path.parent / "memory"
    for r in runs:
        conversation_id = chats[(r.turns, STREAMING)]
        logger.info("%d turns: rebuilding the memory from the stored messages", r.turns)
        rebuilding = services_for().chat
        r.rebuilt = timed_send(rebuilding, conversation_id, next(asks), generation)
        logger.info("%d turns: rebuilt, first token after %.2f s; reopening after a restart", r.turns,
                    r.rebuilt.first_token_s)
        rebuilding.flush_memories()  # as the app's exit waits for its memory files
        reopening = services_for().chat
        r.reopened = timed_send(reopening, conversation_id, next(asks), generation)
        reopening.flush_memories()
        r.file_bytes = sum(f.stat().st_size for f in memory_root.glob(f"*/{conversation_id}.pt"))
    live = services_for().chat  # one app run from here on: memories stay in RAM between turns
    for round_ in range(repeats):
        for r in runs:
            logger.info("round %d of %d: one more turn at %d turns", round_ + 1, repeats, r.turns)
            r.live.append(timed_send(live, chats[(r.turns, STREAMING)], next(asks), generation))
            if dense:
                r.dense.append(timed_send(live, chats[(r.turns, DENSE)], next(asks), generation))
    return runs


def _median(timings: Sequence[Timing], field: str) -> float:
    values = [getattr(t, field) for t in timings]
    return statistics.median(v for v in values if v is not None) if any(v is not None for v in values) else 0.0


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value < 100 else f"{value:,.0f} s"


def report(runs: Sequence[ChatRun], max_new_tokens: int) -> str:
    rows = []
    for r in runs:
        rebuilt, reopened = r.rebuilt.first_token_s, r.reopened.first_token_s
        rows.append([f"{r.turns:,}", _seconds(reopened), _seconds(rebuilt), f"{rebuilt / reopened:,.1f}x",
                     _kib(r.file_bytes)])
    parts = ["Reopening a streaming-dialogue chat: time to the reply's first token",
             _table(["turns", "from its file (after a restart)", "rebuilt from the messages", "rebuilt / file",
                     "memory file"], rows)]

    rows = []
    for r in runs:
        meter = r.live[-1].meter
        dense_read = r.dense[-1].meter if r.dense else None
        rows.append([f"{r.turns:,}", f"{meter.utterances:,}", f"{meter.cached_tokens:,}", _kib(meter.kv_bytes),
                     _kib(meter.dense_kv_bytes), f"{meter.reduction:,.1f}x",
                     _kib(dense_read.kv_bytes) if dense_read else "-"])
    parts += ["", "The memory meter after the last turn (KV held; dense would hold every token seen)",
              _table(["turns", "utterances", "cached tokens", "streaming-dialogue KV", "dense KV, every token",
                      "times smaller", "dense as the app reads it"], rows)]

    base = runs[0].live
    rows = []
    for r in runs:
        cells = [f"{r.turns:,}"]
        for name in ("first_token_s", "last_token_s", "done_s"):
            cells.append(_seconds(_median(r.live, name)))
        cells.append(f"{_median(r.live, 'last_token_s') / _median(base, 'last_token_s'):.2f}x")
        cells += [f"{_median(r.live, 'step_s') * 1000:.1f} ms",
                  f"{_ratio(_median(r.live, 'step_s'), _median(base, 'step_s'))}"]
        if r.dense:
            cells += [_seconds(_median(r.dense, "last_token_s")),
                      f"{_median(r.dense, 'last_token_s') / _median(r.live, 'last_token_s'):.1f}x"]
        rows.append(cells)
    header = ["turns", "first token", "last token", "turn done", f"last token / at {runs[0].turns:,} turns",
              "per token after the first", f"per token / at {runs[0].turns:,} turns"]
    if runs[0].dense:
        header += ["dense, last token", "dense / streaming"]
    repeats = len(base)
    parts += ["", f"One more turn with the memory in RAM, median of {repeats} interleaved rounds", _table(header, rows)]

    replies = [t for r in runs for t in [*r.live, *r.dense]]
    full = sum(t.new_tokens >= max_new_tokens for t in replies)
    parts.append(f"replies at the {max_new_tokens}-token limit: {full} of {len(replies)}")
    return "\n".join(parts)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default=None, help="a memory adapter (train-memory) applied to the model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--turns", type=_ints, default=(10, 500, 5000), help="chat lengths, in turns (the first is "
                        "the baseline of the turn ratio)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of live turns")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="an AlignX JSON file (prompts, chosen replies)")
    parser.add_argument("--skip-dense", action="store_true", help="no dense twin chats (their turns are the slow part)")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """Run the chats, print the report with the command, model and wall time, and return it."""
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    distinct = chat_pairs(args.data)
    pairs = cycled(distinct, max(args.turns))

    import torch

    import storage
    from personalign.engine import Engine
    from personalign.generation import GenerationConfig
    from personalign.models import ModelConfig, load_model
    from personalign.services import build_services

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # its CPU cost per layer call dominates a small model's turn
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=0)
    loaded = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize,
                                    adapter=Path(args.adapter) if args.adapter else None))
    engine = Engine(loaded)
    with tempfile.TemporaryDirectory() as folder:
        db = storage.Database.open(Path(folder) / "chat.db")
        try:
            runs = run(db, lambda: build_services(db, engine), sorted(set(args.turns)), pairs, generation,
                       args.repeats, not args.skip_dense)
        finally:
            db.close()

    info = engine.info()
    text = "\n".join([
        f"command: {shlex.join(['benchmarks/long_chat.py', *argv])}",
        (f"model: {info['name']} ({info['dtype']}, quantization {info['quantization']}); "
         f"adapter: {loaded.adapter or 'none'}; device: {info['device']}; context {engine.max_context():,}"),
        f"chat text: {args.data.name}, {len(distinct):,} distinct (prompt, chosen) pairs",
        "",
        report(runs, args.max_new_tokens),
        f"\nwall time: {time.perf_counter() - started:.1f} s (model load {loaded.load_seconds:.1f} s)",
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
