"""StreamingDialogue memory training: teach the conversational attention sinks to hold information.

Without training, the EoU tokens that StreamingDialogue keeps in the cache (``streaming_dialogue.py``)
carry only what the base model happens to put there. Two LoRA objectives (Li et al., 2024) make
them hold their utterance:

- SMR, short-memory reconstruction: ``BOS (u EoU u EoU)×k``. The second copy of each u is the
  target, and it sees only BOS, the first copy's EoU and its own causal prefix, so the EoU is
  the only way the first copy's content can reach it.
- LMR, long-memory reactivation: many (u, u') pairs from different dialogues, then one earlier
  pair again. The re-appended pair is the target and sees only BOS, the EoU sinks and its own
  pair's prefix, so it must be recalled from sinks far back.

The published recipe then trains on whole dialogues under the inference mask itself (every
utterance sees BOS, the earlier EoUs, the previous utterance and its own prefix), so the model
learns to converse with the sinks rather than only to copy through them. ``method="all"`` runs
that as a second stage after SMR and LMR; ``"dialogue"`` runs it alone. ``loss_on="replies"``
(not published) keeps that stage's loss to the replies to questions, the turns that must read a sink.

Sequences are plain text, ``BOS u1 EoU u2 EoU ...`` (no chat template, no speaker tags), as in the
paper. The attention patterns are given to the model as 4D additive masks, which transformers
passes through to eager and SDPA attention unchanged; nothing in the model is patched, and the
LoRA wrapper is removed again when training ends, so the caller's model is left as it was.

The module knows nothing about the app, storage or the UI. It reads a corpus file or makes a
synthetic one, trains on a ``LoadedModel`` and writes a peft adapter folder that
``models.load_model(ModelConfig(adapter=...))`` applies.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalign.adapter_training import (
    TARGET_MODULES,
    LoraSettings,
    check_out_dir,
    lora_session,
    optimize,
    planned_steps,
    write_metadata,
)
from personalign.models import LoadedModel, check_adapter_folder, read_adapter_metadata
from personalign.recall_dialogues import FAR, NEAR, recall_dialogues
from personalign.streaming_dialogue import additive_mask

logger = logging.getLogger(__name__)

METHODS = ("smr", "lmr", "both", "dialogue", "all")
"""``both``: SMR and LMR mixed; ``all``: that, then the dialogue stage (the published recipe)."""
LOSS_ON = ("all", "replies")
"""Which utterances carry the dialogue stage's loss: every one after the first (published), or only
replies to a question (an utterance after one ending in "?"), where an answer must come back from a sink."""
SYNTHETIC = "synthetic"
"""The ``samples_source`` (and ``--data``) value that selects the built-in synthetic dialogues."""
RECALL_SOURCES = {"recall-near": NEAR, "recall-far": FAR}
"""Built-in recall dialogues (``recall_dialogues``), by the ``samples_source`` that selects them:
questions 1-12 or 1-32 utterances after their facts. Trained with ``loss_on="replies"``, near first
and far from that adapter (``start_from``), they teach the sinks to be read."""
BUILT_IN_SOURCES = (SYNTHETIC, *RECALL_SOURCES)
IGNORE = -100  # label of a position that carries no loss (the cross-entropy ignore_index)

Dialogue = tuple[str, ...]
ProgressFn = Callable[[int, int, float], None]


@dataclass(frozen=True)
class MemoryTrainingConfig:
    """How to train the sinks. Defaults follow the published recipe (LoRA on q/v, lr 5e-5, 1 epoch)."""

    method: str = "both"  # smr | lmr | both | dialogue | all
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    lr: float = 5e-5
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps, even mid-epoch
    batch_size: int = 4
    max_tokens: int = 512  # longest training sequence; longer utterances are cut to fit
    pairs: int = 8  # (u, u) pairs per SMR sequence; (u, u') pairs before the re-appended one in LMR
    seed: int = 0
    samples: int = 1000  # dialogues drawn from a built-in source
    modules: tuple[str, ...] = TARGET_MODULES  # the published q_proj, v_proj
    loss_on: str = "all"  # all | replies, of the dialogue stage (see LOSS_ON)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}; got {self.loss_on!r}")
        if self.loss_on != "all" and self.method not in ("dialogue", "all"):
            raise ValueError(f"loss_on={self.loss_on!r} chooses the dialogue stage's targets, and method "
                             f"{self.method!r} has no dialogue stage; use dialogue or all")
        for name in ("epochs", "batch_size", "pairs", "samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        self.lora  # noqa: B018 -- validates rank, alpha, dropout and modules
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a positive learning rate below 1; got {self.lr!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a positive integer or None; got {self.max_steps!r}")
        # BOS, then the LMR minimum: one pair and its re-appended copy, each utterance >= 1 token + EoU.
        if not isinstance(self.max_tokens, int) or self.max_tokens < 9:
            raise ValueError(f"max_tokens must be an integer of at least 9; got {self.max_tokens!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")  # noqa: TRY004 -- a config error

    @property
    def lora(self) -> LoraSettings:
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, modules=self.modules)

    @property
    def max_utterance_tokens(self) -> int:
        """Longest utterance kept whole: a pair and its copy (4 utterances, 4 EoUs) plus BOS must fit."""
        return (self.max_tokens - 1) // 4 - 1


# --- data sources -------------------------------------------------------------------------------


def load_corpus(path: Path | str) -> list[Dialogue]:
    """Read a user corpus: JSONL of ``{"dialogue": ["utt", ...]}`` lines, or plain text.

    Plain text holds one utterance a line, and a blank line between dialogues. A ``.jsonl`` file,
    or any file whose first non-blank line is a JSON object, is read as JSONL.
    Raises ``ValueError`` with the file and line for anything that cannot be used.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ValueError(f"corpus file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ValueError(f"corpus path {path} is a folder; give a text or JSONL file") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {exc}") from exc
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if path.suffix.lower() == ".jsonl" or first.startswith("{"):
        dialogues = _parse_jsonl(text, path)
    else:
        dialogues = _parse_text(text)
    if not dialogues:
        raise ValueError(f"corpus file {path} holds no utterances")
    return dialogues


def _parse_text(text: str) -> list[Dialogue]:
    dialogues, current = [], []
    for line in [*text.splitlines(), ""]:  # the sentinel closes the last dialogue
        if line.strip():
            current.append(line.strip())
        elif current:
            dialogues.append(tuple(current))
            current = []
    return dialogues


def _parse_jsonl(text: str, path: Path) -> list[Dialogue]:
    dialogues = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg})") from exc
        turns = record.get("dialogue") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise ValueError(f'{path} line {number}: expected {{"dialogue": ["utterance", ...]}} (a list of strings)')
        kept = tuple(t.strip() for t in turns if t.strip())
        if kept:
            dialogues.append(kept)
    return dialogues


_FIRST = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal",
          "Lucia", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Stefan", "Tamsin", "Umar", "Vera",
          "Wendell", "Ximena", "Yusuf", "Zofia", "Amara", "Boris", "Clara", "Dev")
_LAST = ("Moreau", "Okafor", "Lindqvist", "Tanaka", "Rossi", "Novak", "Haddad", "Fischer", "Silva", "Kowalski",
         "Brennan", "Petrov", "Mendez", "Nakamura", "Osei", "Virtanen", "Dubois", "Horvat", "Castillo", "Weber")
_CITIES = ("Lisbon", "Oslo", "Nairobi", "Kyoto", "Montreal", "Krakow", "Valparaiso", "Tallinn", "Porto", "Bergen",
           "Marrakesh", "Hobart", "Ljubljana", "Cusco", "Tbilisi", "Dundee", "Adelaide", "Seville", "Riga", "Quito")
_COLOURS = ("red", "teal", "yellow", "violet", "orange", "green", "navy blue", "pink", "grey", "turquoise",
            "maroon", "lime green", "white", "black", "amber")
_PETS = ("dog", "cat", "parrot", "rabbit", "hamster", "tortoise", "canary", "ferret")  # plural with an s
_PET_NAMES = ("Pepper", "Biscuit", "Miso", "Rocket", "Juniper", "Noodle", "Pickles", "Comet", "Toffee", "Sable",
              "Waffles", "Ziggy")
_JOBS = ("nurse", "carpenter", "pilot", "baker", "librarian", "architect", "vet", "electrician", "chemist",
         "bus driver", "translator", "firefighter", "dentist", "gardener", "software tester", "tailor")
_FOODS = ("lentil soup", "sushi", "apple pie", "tacos", "goulash", "dumplings", "paella", "pancakes",
          "falafel", "risotto", "pho", "banana bread")
_HOBBIES = ("rock climbing", "chess", "knitting", "birdwatching", "salsa dancing", "pottery", "kayaking",
            "stamp collecting", "running", "photography")
_INSTRUMENTS = ("cello", "banjo", "trumpet", "piano", "violin", "drums", "flute", "accordion")
_RELATIVES = ("sister", "brother", "cousin", "aunt", "uncle", "grandmother", "neighbour", "best friend")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_CARS = ("van", "hatchback", "pickup truck", "station wagon", "convertible", "scooter")


def _facts(rng: random.Random) -> dict[str, Any]:
    """One speaker's concrete facts; every utterance about them is drawn from these."""
    return {
        "name": rng.choice(_FIRST), "last": rng.choice(_LAST), "age": rng.randint(19, 84),
        "city": rng.choice(_CITIES), "job": rng.choice(_JOBS), "start": rng.randint(5, 10),
        "pet": rng.choice(_PETS), "pets": rng.randint(2, 7), "pet_name": rng.choice(_PET_NAMES),
        "colour": rng.choice(_COLOURS), "colour2": rng.choice(_COLOURS), "food": rng.choice(_FOODS),
        "times": rng.randint(2, 9), "hobby": rng.choice(_HOBBIES), "years": rng.randint(2, 30),
        "relative": rng.choice(_RELATIVES), "rname": rng.choice(_FIRST), "rcity": rng.choice(_CITIES),
        "year": rng.randint(1978, 2024), "house": rng.randint(2, 480), "street": rng.choice(_LAST),
        "instrument": rng.choice(_INSTRUMENTS), "weekday": rng.choice(_WEEKDAYS), "hours": rng.randint(1, 5),
        "month": rng.choice(_MONTHS), "day": rng.randint(1, 28), "car": rng.choice(_CARS),
        "km": rng.randint(12, 390) * 1000, "phone": f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
    }


_INTRO = "Hi, I'm {name} {last}. I'm {age} and I live in {city}."
_TEMPLATES = (
    "I work as a {job} in {city}, and my shift starts at {start} in the morning.",
    "I have {pets} {pet}s at home; the oldest one is called {pet_name}.",
    "My favourite colour is {colour}, so last {month} I painted my front door {colour}.",
    "My {relative} {rname} moved to {rcity} in {year} and still lives there.",
    "I live at number {house} on {street} Street, right next to the {colour2} bakery.",
    "Every {weekday} I practise the {instrument} for {hours} hours.",
    "Nothing beats {food}; I had {food} {times} times last week.",
    "My birthday is on {month} {day}, and I have been into {hobby} for {years} years.",
    "I drive an old {colour2} {car} with {km} kilometres on it.",
    "If you need me, my number is {phone}, but I rarely answer before {start}.",
)
# A reply that brings back what the other person said earlier, one per statement above (the
# introduction first), in the same order. Its values can only come from that earlier utterance.
_ECHOES = (
    "You told me you're {age} and live in {city}, right?",
    "So your shift as a {job} starts at {start}? That is early.",
    "How are your {pets} {pet}s doing? Is {pet_name} still the oldest?",
    "Your {colour} front door sounds lovely.",
    "Do you visit {rname} in {rcity} often?",
    "Number {house} on {street} Street, I think I know that bakery.",
    "{hours} hours of {instrument} every {weekday} is a lot of practice!",
    "{food} {times} times in one week? You must really love it.",
    "I'll remember your birthday: {month} {day}.",
    "{km} kilometres on a {car} is impressive.",
    "I saved your number, {phone}.",
)
# A question a speaker asks about a fact they stated themselves, and the other speaker's answer,
# one pair per statement above (the introduction first), in the same order. Worded unlike the
# statements, so the answer cannot be copied from the question: its values must come back from
# the statement, which by then the StreamingDialogue cache holds only as its EoU.
_QUESTIONS = (
    ("Do you still remember where I live?", "Of course, you live in {city}."),
    ("What time does my shift begin, do you remember?", "Your shift begins at {start}."),
    ("Can you recall what my oldest {pet} is called?", "Your oldest {pet} is {pet_name}."),
    ("Quick test: what colour is my front door?", "Your front door is {colour}."),
    ("Where did my {relative} move to, and when?", "{rname} moved to {rcity} in {year}."),
    ("Do you remember my address?", "You live at number {house} on {street} Street."),
    ("How long do I practise each week?", "You practise the {instrument} for {hours} hours every {weekday}."),
    ("What did I say I had so often last week?", "You had {food} {times} times."),
    ("Did you note down my birthday?", "Yes, it is {month} {day}."),
    ("How many kilometres are on my car?", "Your {car} has {km} kilometres on it."),
    ("Do you have my phone number?", "Yes: {phone}."),
)
_OPENERS = ("Good to know, {other}. ", "Thanks, {other}. ", "I see, {other}. ", "", "", "")
_CLOSERS = (" What about you, {other}?", " And you, {other}?", "", "", "")
ECHO_RATE = 0.4  # share of turns, from the fifth on, that echo the other speaker instead of adding a fact
QUESTION_RATE = 0.3  # share of the remaining turns from the fifth on that ask about an own fact


def synthetic_dialogues(count: int, seed: int = 0) -> list[Dialogue]:
    """``count`` made-up two-person dialogues full of concrete facts, the same for the same seed.

    Names, numbers, colours and cities change from dialogue to dialogue, so copying an utterance
    back is only possible by remembering it: exactly what SMR and LMR reward. From the fifth
    turn on, a speaker sometimes echoes a fact the other stated at least three utterances back,
    or asks about a fact of their own stated at least two utterances back, and the other answers.
    Neither source is the previous utterance, which the StreamingDialogue cache keeps whole, so
    the dialogue stage's loss on an echo or an answer can only fall by reading the fact out of an
    EoU sink. The answers train the recall a user asks for: a question cues which sink to read.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    rng = random.Random(seed)
    dialogues = []
    for _ in range(count):
        people = [_facts(rng), _facts(rng)]
        topics = [rng.sample(range(len(_TEMPLATES)), len(_TEMPLATES)) for _ in people]
        stated: list[tuple[int, int]] = []  # (utterance index, statement) of every fact-stating turn
        turns: list[str] = []
        for _move in range(rng.randint(6, 12)):
            i = len(turns)
            me, other = people[i % 2], people[1 - i % 2]["name"]
            # The other speaker's statements three or more utterances back (i-3, i-5, ...), and
            # this speaker's own two or more back (i-2, i-4, ...).
            theirs = [k for j, k in stated if j % 2 != i % 2 and j <= i - 3]
            mine = [k for j, k in stated if j % 2 == i % 2 and j <= i - 2]
            if i >= 4 and theirs and rng.random() < ECHO_RATE:
                turns.append(_ECHOES[rng.choice(theirs)].format(**people[1 - i % 2]))
                continue
            if i >= 4 and mine and rng.random() < QUESTION_RATE:
                question, answer = _QUESTIONS[rng.choice(mine)]
                turns += [question.format(**me), answer.format(**me)]
                continue
            statement = 0 if i < 2 else 1 + topics[i % 2].pop()
            stated.append((i, statement))
            body = _INTRO if statement == 0 else _TEMPLATES[statement - 1]
            opener = "" if i == 0 else "Nice to meet you, {other}! " if i == 1 else rng.choice(_OPENERS)
            text = opener + body.format(**me) + rng.choice(_CLOSERS)
            turns.append(text.format(other=other))
        dialogues.append(tuple(turns))
    return dialogues


def _template_pattern(template: str) -> re.Pattern[str]:
    """A regex matching ``template`` with any text in each ``{field}``."""
    pattern = re.escape(template)
    for name in set(re.findall(r"\{(\w+)\}", template)):
        pattern = pattern.replace(re.escape("{" + name + "}"), ".+?")
    return re.compile(pattern)


_ASKED = tuple(_template_pattern(question) for question, _ in _QUESTIONS)


def answer_indices(dialogue: Sequence[str]) -> list[int]:
    """Which utterances of a built-in dialogue answer one of its questions (each follows its question).

    These are the targets that need recall most directly: the fact they give back was stated
    before the question, so the StreamingDialogue cache holds it only as an EoU sink.
    """
    return [i for i in range(1, len(dialogue)) if any(p.fullmatch(dialogue[i - 1]) for p in _ASKED)]


def reply_indices(dialogue: Sequence[str]) -> list[int]:
    """Which utterances reply to a question: those after an utterance that ends in a question mark.

    Works on any corpus, unlike ``answer_indices``: in the built-in dialogues it finds every answer
    (and the statements that follow a "What about you?"). Under the inference mask a reply sees its
    question whole, so what the question asks about further back must come out of a sink.
    """
    return [i for i in range(1, len(dialogue)) if dialogue[i - 1].rstrip().endswith("?")]


def load_dialogues(source: str | Path | Sequence[Sequence[str]], config: MemoryTrainingConfig) -> list[Dialogue]:
    """Dialogues from ``source``: a name of ``BUILT_IN_SOURCES``, a corpus file path, or dialogues
    already in memory. A built-in source draws ``config.samples`` dialogues with ``config.seed``."""
    if isinstance(source, str) and source == SYNTHETIC:
        return synthetic_dialogues(config.samples, config.seed)
    if isinstance(source, str) and source in RECALL_SOURCES:
        return recall_dialogues(config.samples, config.seed, shape=RECALL_SOURCES[source])
    if isinstance(source, (str, Path)):
        return load_corpus(source)
    dialogues = [tuple(u.strip() for u in d if isinstance(u, str) and u.strip()) for d in source]
    dialogues = [d for d in dialogues if d]
    if not dialogues:
        raise ValueError("no dialogues to train on: every dialogue given is empty")
    return dialogues


# --- training samples ---------------------------------------------------------------------------


SEES_EOU, SEES_ALL = 1, 2  # how one utterance may see another, in ``MemorySample.links``


@dataclass(frozen=True)
class MemorySample:
    """One training sequence: ids, which tokens carry the loss, and who may attend to whom.

    The attention pattern is kept per utterance (``links``, N×N) and expanded to tokens on
    demand, so a corpus of long sequences does not hold a T×T mask per sample in memory.
    """

    input_ids: torch.Tensor  # (T,) long: BOS, then each utterance followed by the EoU
    labels: torch.Tensor  # (T,) long: the token itself where it carries loss, else IGNORE (-100)
    links: torch.Tensor  # (N, N) int8: [i, j] is SEES_ALL, SEES_EOU or 0 for query utterance i, key utterance j < i
    eou_id: int
    kind: str  # smr | lmr | dialogue

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def utterance_of_token(self) -> torch.Tensor:
        """(T,) long: the utterance (0-based) each token belongs to, an EoU to the one it ends; -1 for BOS."""
        is_eou = (self.input_ids == self.eou_id).long()  # (T,)
        utt = torch.cumsum(is_eou, 0) - is_eou  # (T,)
        utt[0] = -1
        return utt

    @property
    def attention(self) -> torch.Tensor:
        """(T, T) bool, True where query row i may attend to key column j.

        Every token sees BOS and its own causal prefix within its utterance, plus what ``links``
        grants its utterance: another utterance whole, or only its EoU.
        """
        is_eou = self.input_ids == self.eou_id  # (T,)
        utt = self.utterance_of_token  # (T,)
        q, k = utt[:, None], utt[None, :]  # (T, 1), (1, T)
        link = self.links[q.clamp(min=0), k.clamp(min=0)]  # (T, T); rows/columns of BOS are settled below
        seen = (q == k) | (link == SEES_ALL) | ((link == SEES_EOU) & is_eou[None, :])  # (T, T)
        seen[:, 0] = True  # BOS, the first sink
        return seen & torch.ones_like(seen).tril()  # (T, T), causal


def _layout(utterances: Sequence[Sequence[int]], eou_id: int, bos_id: int) -> tuple[torch.Tensor, list[range]]:
    """``BOS u1 EoU u2 EoU ...`` (T,) and the span of each utterance (its tokens and its EoU)."""
    ids, spans = [bos_id], []
    for utt in utterances:
        if eou_id in utt or bos_id in utt:  # the mask finds utterances by their EoU
            raise ValueError("an utterance holds the BOS or EoU id; only the layout may place them")
        start = len(ids)
        ids += [int(t) for t in utt] + [eou_id]
        spans.append(range(start, len(ids)))
    return torch.as_tensor(ids, dtype=torch.long), spans


def _labels(ids: torch.Tensor, targets: Iterable[range]) -> torch.Tensor:
    labels = torch.full_like(ids, IGNORE)  # (T,)
    for span in targets:
        labels[span.start:span.stop] = ids[span.start:span.stop]
    return labels


def smr_sample(utterances: Sequence[Sequence[int]], eou_id: int, bos_id: int) -> MemorySample:
    """``BOS (u EoU u EoU)×k`` for the k token lists in ``utterances``.

    Each second copy sees BOS, its own causal prefix and the EoU of its first copy, never the
    first copy's tokens; each first copy sees BOS and its own prefix. The loss is on the second
    copies, their EoU included (labels are unshifted: the model shifts them).
    """
    doubled = [u for utt in utterances for u in (utt, utt)]
    ids, spans = _layout(doubled, eou_id, bos_id)
    links = torch.zeros(len(spans), len(spans), dtype=torch.int8)  # (N, N)
    second = torch.arange(1, len(spans), 2)
    links[second, second - 1] = SEES_EOU
    return MemorySample(ids, _labels(ids, spans[1::2]), links, eou_id, "smr")


def lmr_sample(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], repeat: int, eou_id: int,
               bos_id: int) -> MemorySample:
    """``BOS u1 EoU u1' EoU ... un EoU un' EoU ur EoU ur' EoU`` with r = ``repeat``.

    Inside a pair, u' sees all of u, as a reply sees its prompt at inference; across pairs (they
    come from different dialogues) every token sees only BOS and the earlier EoUs. The re-appended
    pair sees the same, so its content can come back only through the sinks. The loss is on it.
    """
    if not 0 <= repeat < len(pairs):
        raise ValueError(f"repeat must index one of the {len(pairs)} pairs; got {repeat}")
    chain = [u for pair in [*pairs, pairs[repeat]] for u in pair]
    ids, spans = _layout(chain, eou_id, bos_id)
    n = len(spans)
    links = torch.ones(n, n, dtype=torch.int8).tril(-1) * SEES_EOU  # (N, N): every earlier EoU
    second = torch.arange(1, n, 2)
    links[second, second - 1] = SEES_ALL
    return MemorySample(ids, _labels(ids, spans[-2:]), links, eou_id, "lmr")


def dialogue_sample(utterances: Sequence[Sequence[int]], eou_id: int, bos_id: int,
                    targets: Iterable[int] | None = None) -> MemorySample:
    """``BOS u1 EoU u2 EoU ...`` of one dialogue under the inference mask; the loss is on u2 onwards.

    Utterance i sees BOS, the EoUs of all earlier utterances, the whole of utterance i-1 and its
    own prefix: exactly what it sees when the app runs the StreamingDialogue cache. The first
    utterance carries no loss, since nothing before it says what it should be. ``targets``
    (0-based utterance numbers, 1 or more) limits the loss to those utterances.
    """
    if len(utterances) < 2:
        raise ValueError(f"a dialogue sample needs at least two utterances; got {len(utterances)}")
    ids, spans = _layout(utterances, eou_id, bos_id)
    n = len(spans)
    chosen = range(1, n) if targets is None else sorted(set(targets))
    if any(not 1 <= i < n for i in chosen):
        raise ValueError(f"targets must be utterance numbers from 1 to {n - 1}; got {list(chosen)}")
    links = torch.ones(n, n, dtype=torch.int8).tril(-1) * SEES_EOU  # (N, N): every earlier EoU
    links[torch.arange(1, n), torch.arange(n - 1)] = SEES_ALL  # and the whole previous utterance
    return MemorySample(ids, _labels(ids, [spans[i] for i in chosen]), links, eou_id, "dialogue")


def tokenize_dialogues(dialogues: Sequence[Dialogue], tokenizer: Any, max_tokens: int,
                       reserved: Iterable[int] = ()) -> list[list[list[int]]]:
    """Plain-text token ids of every utterance, cut to ``max_tokens``; empty ones dropped.

    Special-token text inside an utterance (a literal ``<|im_end|>``) is split like ordinary text,
    and ``reserved`` ids are dropped, so only the layout places BOS and EoU.
    """
    reserved = set(reserved)
    out = []
    for dialogue in dialogues:
        encoded = tokenizer(list(dialogue), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        utts = [[t for t in ids if t not in reserved][:max_tokens] for ids in encoded]
        out.append([u for u in utts if u])
    return out


def _smr_samples(utts: list[list[int]], config: MemoryTrainingConfig, eou_id: int, bos_id: int) -> list[MemorySample]:
    samples, group, length = [], [], 1
    for utt in utts:
        need = 2 * (len(utt) + 1)
        if group and (len(group) == config.pairs or length + need > config.max_tokens):
            samples.append(smr_sample(group, eou_id, bos_id))
            group, length = [], 1
        group.append(utt)
        length += need
    if group:
        samples.append(smr_sample(group, eou_id, bos_id))
    return samples


def _lmr_samples(pool: list[tuple[int, list[int], list[int]]], config: MemoryTrainingConfig, rng: random.Random,
                 eou_id: int, bos_id: int) -> list[MemorySample]:
    """Group (dialogue, u, u') pairs into LMR sequences, one pair per dialogue in a sequence
    while other dialogues' pairs remain; the largest pair must still fit once more at the end."""
    samples = []
    while pool:
        group, used, rest, length, largest = [], set(), [], 1, 0
        for item in pool:
            size = len(item[1]) + len(item[2]) + 2
            fits = length + size + max(largest, size) <= config.max_tokens
            if len(group) < config.pairs and item[0] not in used and fits:
                group.append(item)
                used.add(item[0])
                length, largest = length + size, max(largest, size)
            else:
                rest.append(item)
        pool = rest
        pairs = [(u, v) for _, u, v in group]
        samples.append(lmr_sample(pairs, rng.randrange(len(pairs)), eou_id, bos_id))
    return samples


def _dialogue_samples(tokenized: list[list[list[int]]], config: MemoryTrainingConfig, eou_id: int,
                      bos_id: int, targets: Sequence[set[int]] | None = None) -> list[MemorySample]:
    """Each dialogue as consecutive runs of utterances that fit ``max_tokens``, two or more to a run.

    ``targets``: per dialogue, the utterances that carry the loss (None: all but each run's first);
    a run holding none of them is left out.
    """
    samples = []
    for number, utts in enumerate(tokenized):
        run: list[list[int]] = []
        first, length = 0, 1  # first: the dialogue's number for the run's first utterance
        for index, utt in enumerate([*utts, None]):
            if utt is None or (run and length + len(utt) + 1 > config.max_tokens):
                wanted = None if targets is None else [i - first for i in targets[number]
                                                       if first < i < first + len(run)]
                if len(run) >= 2 and (wanted is None or wanted):
                    samples.append(dialogue_sample(run, eou_id, bos_id, wanted))
                # The next run starts with the utterance it replies to, as the cache would hold it.
                run, length = run[-1:], 1 + (len(run[-1]) + 1 if run else 0)
                first = index - len(run)
            if utt is not None:
                run.append(utt)
                length += len(utt) + 1
    return samples


def build_stages(dialogues: Sequence[Dialogue], tokenizer: Any, config: MemoryTrainingConfig, *, eou_id: int,
                 bos_id: int) -> list[list[MemorySample]]:
    """The training stages of ``config.method`` in order, each shuffled; deterministic per seed.

    SMR packs every utterance, ``config.pairs`` to a sequence. LMR uses the pairs (u0, u1),
    (u2, u3), ... of each dialogue, ``config.pairs`` from different dialogues to a sequence.
    The dialogue stage takes each dialogue whole, cut into runs that fit ``max_tokens``.
    """
    rng = random.Random(config.seed)
    tokenized = tokenize_dialogues(dialogues, tokenizer, config.max_utterance_tokens, (eou_id, bos_id))
    stages = []
    if config.method != "dialogue":
        stages.append(_memory_samples(tokenized, config, rng, eou_id, bos_id))
    if config.method in ("dialogue", "all"):
        targets = None
        if config.loss_on == "replies":
            if any(len(t) != len(d) for t, d in zip(tokenized, dialogues)):  # an utterance tokenized to nothing
                raise ValueError("loss_on='replies' needs every utterance to keep at least one token")
            targets = [set(reply_indices(d)) for d in dialogues]
        samples = _dialogue_samples(tokenized, config, eou_id, bos_id, targets)
        if not samples and targets is not None:
            raise ValueError("loss_on='replies' found no reply to a question (an utterance after one "
                             "ending in '?') in the dialogues")
        if not samples:
            raise ValueError("the dialogue stage needs dialogues of at least two utterances; none were found")
        rng.shuffle(samples)
        stages.append(samples)
    return stages


def build_samples(dialogues: Sequence[Dialogue], tokenizer: Any, config: MemoryTrainingConfig, *, eou_id: int,
                  bos_id: int) -> list[MemorySample]:
    """Every stage's samples, stage after stage (see ``build_stages``)."""
    return [s for stage in build_stages(dialogues, tokenizer, config, eou_id=eou_id, bos_id=bos_id) for s in stage]


def _memory_samples(tokenized: list[list[list[int]]], config: MemoryTrainingConfig, rng: random.Random, eou_id: int,
                    bos_id: int) -> list[MemorySample]:
    """SMR and/or LMR sequences, shuffled together."""
    samples: list[MemorySample] = []
    if config.method in ("smr", "both", "all"):
        utts = [u for d in tokenized for u in d]
        rng.shuffle(utts)
        samples += _smr_samples(utts, config, eou_id, bos_id)
    if config.method in ("lmr", "both", "all"):
        pool = [(i, d[j], d[j + 1]) for i, d in enumerate(tokenized) for j in range(0, len(d) - 1, 2)]
        if not pool:
            message = "LMR needs dialogues of at least two utterances (a prompt and its reply); none were found"
            if config.method == "lmr":
                raise ValueError(message)
            logger.warning("%s; training SMR only", message)
        rng.shuffle(pool)
        samples += _lmr_samples(pool, config, rng, eou_id, bos_id)
    if not samples:
        raise ValueError("no training samples: every utterance is empty after tokenization")
    rng.shuffle(samples)
    return samples


def collate(samples: Sequence[MemorySample], pad_id: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (B, T), attention_mask (B, 1, T, T) additive float, labels (B, T).

    A padding row attends to itself only, so no softmax row is empty; real rows never see padding.
    """
    t = max(len(s) for s in samples)
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(samples), t), IGNORE, dtype=torch.long)  # (B, T)
    masks = []
    for b, sample in enumerate(samples):
        n = len(sample)
        ids[b, :n], labels[b, :n] = sample.input_ids, sample.labels
        mask = torch.eye(t, dtype=torch.bool)  # (T, T)
        mask[:n, :n] = sample.attention
        masks.append(additive_mask(mask, dtype))  # (1, 1, T, T)
    return {"input_ids": ids, "attention_mask": torch.cat(masks), "labels": labels}  # mask: (B, 1, T, T)


def batch_loss(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are."""
    labels = batch["labels"].to(device)  # (B, T)
    targets = labels[:, 1:]  # (B, T-1): position i predicts token i+1
    # The LM head runs only where some row has a target: LMR labels one pair of many, SMR half.
    keep = (targets != IGNORE).any(0).nonzero().flatten()  # (K,)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   use_cache=False, logits_to_keep=keep).logits  # (B, K, V)
    targets = targets[:, keep]  # (B, K)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def memory_loss(model: Any, samples: Sequence[MemorySample], *, pad_id: int, dtype: torch.dtype,
                device: torch.device, batch_size: int = 4) -> float:
    """Mean cross-entropy per target token of ``samples`` under their memory masks (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        loss, n = batch_loss(model, collate(samples[i:i + batch_size], pad_id, dtype), device)
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


# --- training -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingReport:
    """What a ``train_memory`` run did. ``probe`` is the fixed batch scored before and after."""

    steps: int
    seconds: float
    first_loss: float  # mean per-token loss of the first training batch (before its update)
    last_loss: float  # ... of the last training batch
    probe_loss_before: float
    probe_loss_after: float
    probe_held_out: bool  # False when too few samples to hold some out: the probe was trained on
    train_samples: int
    out_dir: Path
    probe: tuple[MemorySample, ...] = field(repr=False, default=())

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else 0.0


def bos_token_id(loaded: LoadedModel) -> int:
    """The first sink: the tokenizer's BOS, else the model config's (``<|im_start|>`` for ChatML)."""
    for owner in (loaded.tokenizer, getattr(loaded.model, "config", None)):
        bos = getattr(owner, "bos_token_id", None)
        if isinstance(bos, int):
            return bos
    raise ValueError(f"model {loaded.name} defines no BOS token; StreamingDialogue needs one as its first sink")


def _earlier_run(start_from: Path, out: Path) -> dict[str, Any]:
    """What the adapter to go on from was trained on, for the new adapter's record; refuses a
    preference adapter, and writing over the one being continued."""
    if start_from.expanduser().resolve() == out.expanduser().resolve():
        raise ValueError(f"--out {out} is the adapter being continued; write the new one to another folder")
    meta = read_adapter_metadata(check_adapter_folder(start_from))
    if meta.get("purpose", "memory") != "memory":
        raise ValueError(f"the adapter in {start_from} is a {meta['purpose']} adapter, not a memory adapter")
    return {"adapter": start_from.name, **{k: meta[k] for k in ("method", "steps", "data", "date") if k in meta}}


def _split_probe(samples: list[MemorySample], batch_size: int) -> tuple[list[MemorySample], list[MemorySample], bool]:
    """Hold out one batch (at most a tenth of the samples) to score before and after training."""
    held = min(batch_size, len(samples) // 10)
    if held == 0:
        return samples[:batch_size], samples, False
    return samples[:held], samples[held:], True


def train_memory(loaded: LoadedModel, samples_source: str | Path | Sequence[Sequence[str]],
                 config: MemoryTrainingConfig, out_dir: Path | str,
                 progress: ProgressFn | None = None, start_from: Path | str | None = None) -> TrainingReport:
    """Train the memory LoRA on ``loaded.model`` and save the adapter in ``out_dir``.

    The LoRA adapts ``config.modules`` (q_proj and v_proj by default, as published).

    The stages of ``config.method`` run in order (``all``: SMR and LMR, then the dialogue stage),
    each for ``config.epochs``; ``config.max_steps`` caps the steps of all stages together.

    ``samples_source`` is a built-in source (``"synthetic"``, ``"recall-near"``, ``"recall-far"``),
    a corpus file (see ``load_corpus``) or a list of dialogues. ``progress(step, total, loss)``
    is called after every optimizer step. The adapter goes to ``out_dir`` (peft's
    ``save_pretrained``) with ``ADAPTER_METADATA`` beside it.
    The LoRA layers are removed afterwards, leaving ``loaded.model`` as it was.

    ``start_from``: a memory adapter to go on training rather than a fresh LoRA, so the two
    published stages can run as two commands (``both``, then ``dialogue`` from its adapter).
    It must have this run's rank, alpha and modules, and is left as it was: ``out_dir`` must differ.

    A 4-bit or 8-bit base is trained as it stands (frozen, LoRA weights in float32), rather than
    through peft's ``prepare_model_for_kbit_training``: that casts the base to float32 for good,
    which the app's shared model must not undergo, and a 135M model needs none of its savings.
    """
    out = check_out_dir(out_dir)
    earlier = None if start_from is None else _earlier_run(Path(start_from), out)
    dialogues = load_dialogues(samples_source, config)
    eou, bos = loaded.eou_token_id, bos_token_id(loaded)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else eou
    # One probe per stage, scored together: the loss on held-out sequences of every objective trained.
    split = [_split_probe(stage, config.batch_size)
             for stage in build_stages(dialogues, loaded.tokenizer, config, eou_id=eou, bos_id=bos)]
    probe = [s for stage_probe, _, _ in split for s in stage_probe]
    held_out = all(h for _, _, h in split)
    stages, budget = [], config.max_steps
    for _, train, _ in split:  # --steps caps the whole run: later stages get what earlier ones leave
        steps = planned_steps(len(train), config.batch_size, config.epochs, budget)
        stages.append((train, steps))
        budget = None if budget is None else budget - steps
    total = sum(steps for _, steps in stages)
    logger.info("memory training (%s): %d dialogues -> %s sequences, %d steps", config.method, len(dialogues),
                " then ".join(str(len(train)) for train, _ in stages), total)
    score = {"pad_id": pad, "dtype": loaded.dtype, "device": loaded.device, "batch_size": config.batch_size}

    start = None if start_from is None else Path(start_from)
    with lora_session(loaded, config.lora, config.seed, start_from=start) as peft_model:
        probe_before = memory_loss(peft_model, probe, **score)  # the base model, or the adapter gone on from

        def step(batch_samples: list[MemorySample]) -> float:
            loss_sum, count = batch_loss(peft_model, collate(batch_samples, pad, loaded.dtype), loaded.device)
            loss = loss_sum / max(count, 1)
            loss.backward()
            return loss.item()

        losses, seconds = [], 0.0
        for train, steps in stages:  # a fresh optimizer per stage, as two training runs would have
            if steps < 1:
                continue
            done = len(losses)

            def stage_progress(n: int, _: int, loss: float, done: int = done) -> None:
                if progress is not None:
                    progress(done + n, total, loss)

            stage_losses, stage_seconds = optimize(peft_model, train, step, lr=config.lr,
                                                   batch_size=config.batch_size, total=steps, seed=config.seed,
                                                   progress=stage_progress)
            losses, seconds = losses + stage_losses, seconds + stage_seconds
        probe_after = memory_loss(peft_model, probe, **score)
        peft_model.save_pretrained(str(out))
        data = samples_source if isinstance(samples_source, str) and samples_source in BUILT_IN_SOURCES else (
            Path(samples_source).name if isinstance(samples_source, (str, Path)) else "in-memory dialogues")
        write_metadata(out, loaded, "memory", config.lora, {
            "bos_token_id": bos, "method": config.method, "steps": len(losses), "final_loss": round(losses[-1], 6),
            "probe_loss_before": round(probe_before, 6), "probe_loss_after": round(probe_after, 6),
            "lr": config.lr, "epochs": config.epochs, "max_tokens": config.max_tokens, "seed": config.seed,
            "loss_on": config.loss_on,
            # How far back a query read a sink in training: memory.memory_reach caps the cache with it.
            "longest_sequence": max((len(s) for train, _ in stages for s in train), default=0),
            "data": data, "continued_from": earlier,
        })
    logger.info("memory training done: %d steps in %.1f s, loss %.4f -> %.4f", len(losses), seconds, losses[0],
                losses[-1])
    return TrainingReport(steps=len(losses), seconds=seconds, first_loss=losses[0], last_loss=losses[-1],
                          probe_loss_before=probe_before, probe_loss_after=probe_after, probe_held_out=held_out,
                          train_samples=sum(len(train) for train, _ in stages), out_dir=out, probe=tuple(probe))
