"""Memory recall, KV bytes, per-turn latency and perplexity: dense vs StreamingLLM vs StreamingDialogue.

    PYTHONPATH=. python benchmarks/memory_recall.py [--model embedded] [--adapter DIR ...] [--device auto]
        [--distances 1,10,100] [--trials 3] [--seed 0] [--turns 10,100,1000] [--parts long,recall]
        [--json out.json]

Dialogues are synthetic and deterministic by seed: small-talk filler, with facts stated at
known utterances ("My sister's name is Clara.", "The locker code is 4721."). A question about
a fact comes N utterances after it (N = the distance; 1 = the very next utterance). Recall is
scored as multiple choice, robust enough for a 135M model: the summed log-prob of each
candidate answer ("Your sister's name is" + " Clara" / " Maria" / ...; the true value and 3
distractors of the same type) given the memory state; the top-scoring candidate counts.
Chance is 25%.

Format: the StreamingDialogue paper's ``BOS u1 EoU u2 EoU ...``, each utterance plain text
with no speaker tags, closed by the model's end-of-turn token (``<|im_end|>`` for SmolLM2).
Chosen over ChatML turns because (a) it is the format the SMR/LMR memory training uses, so an
``--adapter`` is measured on what it learned, and (b) an utterance is then exactly one
EoU-closed span: ChatML adds ``<|im_start|>role`` tokens and puts the newline after each EoU
into the next utterance, which blurs "N utterances later" and what each sink summarises.

Memory policies, fed the same dialogue one utterance at a time:
- ``dense``: the whole history re-read every turn, the oldest utterances dropped (BOS kept)
  once it no longer fits the model's context minus room for the new turn, as the app does;
- ``streaming-llm``: ``StreamingLLMCache`` (sinks + a recent window), compressed per utterance;
- ``streaming-dialogue``: ``StreamingDialogueCache`` (BOS + every EoU + the latest utterance),
  untrained, and trained when ``--adapter`` is given (a LoRA from ``train-memory``; repeat
  ``--adapter`` to set several trained rows side by side, named by their folders).
The caches run under each position rule named in ``--positions`` (see ``memory_cache``):
``compressed`` (kept keys keep their rotation, new tokens count from the compressed length, the
reference code's rule), ``slot`` (kept keys re-rotated to their slot in the cache, StreamingLLM's
rule) and ``distance`` (every kept key at its true distance in the dialogue, capped at the
context: what the memory training trains under). Under the distance rule each ``--adapter`` adds
rows at the cap the app puts on it (half its longest training sequence, ``memory_positions``),
untrained and trained, so that those rows are the app's very caches.

Beside recall, a single long dialogue is fed to every policy in lockstep and measured at the
``--turns`` checkpoints: KV bytes held (dense: what its re-read holds, and what it would hold
without truncation, both from the model config and dtype), perplexity of held-back utterances
(scored as the next utterance, never fed), and, at the first and last checkpoint, the time of
one turn (a user utterance in, a ``--reply-tokens`` greedy reply out; dense re-prefills its whole
truncated history, the caches prefill only the new utterance and compress; the reply decodes
as the app's does, from CUDA graph steps on CUDA), taken side by side,
alternating policies, so the ratios are fair; absolute times count only on the machine used.
``--parts`` picks the long dialogue, recall or both; the long dialogue runs first.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from personalign.generation import (
    DecodeSteps,
    new_cache,
    position_ids_after,
    prefill,
)
from personalign.memory import kv_bytes_per_token, memory_positions, memory_reach
from personalign.memory_cache import POSITION_RULES, Positions
from personalign.recall_dialogues import FactType, filler_utterance
from personalign.streaming_dialogue import StreamingDialogueCache
from personalign.streaming_llm import StreamingLLMCache, StreamingLLMConfig

logger = logging.getLogger("memory_recall")

CANDIDATES = 4  # the true value + 3 distractors
LEAD = 2  # filler utterances before the oldest fact, so no fact sits right after BOS
DENSE_RESERVE = 128  # tokens the dense window leaves free for the new turn and its reply
PARTS = ("long", "recall")  # what a run measures: the long dialogue's sizes and times, recall by distance


# --- synthetic dialogues (pure) -----------------------------------------------------------------


# The ten fact types probed. Training on them (``recall_transfer.py``) is a per-type experiment; the
# built-in recall source (``recall_dialogues.TRAINING_FACTS``) never states them.
FACT_TYPES: tuple[FactType, ...] = (
    FactType("sister", "My sister's name is {}.", "What is my sister's name?", "Your sister's name is",
             ("Clara", "Maria", "Sofia", "Helen", "Grace", "Alice", "Laura", "Emma", "Julia", "Nina")),
    FactType("locker", "The locker code is {}.", "What is the locker code?", "The locker code is",
             ("4721", "3958", "6104", "8237", "1592", "7046", "2863", "5319", "9480", "6675")),
    FactType("city", "I grew up in {}.", "Where did I grow up?", "You grew up in",
             ("Lisbon", "Oslo", "Dublin", "Prague", "Vienna", "Madrid", "Warsaw", "Athens", "Zurich", "Helsinki")),
    FactType("pet", "My dog is called {}.", "What is my dog called?", "Your dog is called",
             ("Max", "Rocky", "Buddy", "Charlie", "Bella", "Daisy", "Luna", "Milo", "Toby", "Rosie")),
    FactType("colour", "My favourite colour is {}.", "What is my favourite colour?", "Your favourite colour is",
             ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "grey", "white")),
    FactType("car", "I drive a {}.", "What car do I drive?", "You drive a",
             ("Toyota", "Honda", "Volvo", "Ford", "Nissan", "Tesla", "Fiat", "Mazda", "Subaru", "Renault")),
    FactType("day", "The team meeting is on {}.", "What day is the team meeting?", "The team meeting is on",
             ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")),
    FactType("job", "I work as a {}.", "What do I work as?", "You work as a",
             ("nurse", "teacher", "baker", "pilot", "lawyer", "plumber", "dentist", "farmer", "chef", "painter")),
    FactType("instrument", "I play the {}.", "Which instrument do I play?", "You play the",
             ("piano", "violin", "guitar", "flute", "cello", "drums", "trumpet", "harp", "banjo", "clarinet")),
    FactType("room", "My hotel room number is {}.", "What is my hotel room number?", "Your hotel room number is",
             ("214", "508", "731", "126", "943", "352", "687", "409", "865", "573")),
)

@dataclass(frozen=True)
class Probe:
    """A question about the fact stated ``distance`` utterances before it, as multiple choice."""

    fact: str  # FactType.key
    distance: int
    fact_index: int  # utterance (0-based) that states the fact
    question: str
    answer: str  # the answer opener, fed before each candidate
    candidates: tuple[str, ...]
    correct: int  # index of the true value in candidates


@dataclass(frozen=True)
class Dialogue:
    """Utterances (the question is asked after the last one), probes, and utterances never fed."""

    utterances: tuple[str, ...]
    probes: tuple[Probe, ...]
    held_back: tuple[str, ...]


def build_dialogue(seed: int, distances: Sequence[int], *, length: int | None = None, held_back: int = 0,
                   kinds: Sequence[FactType] = FACT_TYPES) -> Dialogue:
    """A filler dialogue with one fact per distance, stated ``distance`` utterances before the end.

    Each distance gets a different fact type of ``kinds``, so every question has one answer.
    ``length`` defaults to ``LEAD + max(distances)``; ``held_back`` extra filler utterances are
    drawn for scoring (perplexity, or the user side of a timed turn).
    """
    distances = [int(d) for d in distances]
    if len(set(distances)) != len(distances) or any(d < 1 for d in distances):
        raise ValueError(f"distances must be distinct whole numbers >= 1; got {distances}")
    if len(distances) > len(kinds):
        raise ValueError(f"at most {len(kinds)} distances per dialogue (one fact type each)")
    n = LEAD + max(distances, default=0) if length is None else int(length)
    if distances and n < max(distances):
        raise ValueError(f"a dialogue of {n} utterances cannot hold a fact {max(distances)} utterances back")
    rng = random.Random(seed)
    utterances = [filler_utterance(rng) for _ in range(n)]
    probes = []
    for distance, kind in zip(distances, rng.sample(list(kinds), len(distances))):
        values = rng.sample(kind.values, CANDIDATES)  # values[0] is the fact, the rest distractors
        index = n - distance
        utterances[index] = kind.statement.format(values[0])
        candidates = list(values)
        rng.shuffle(candidates)
        probes.append(Probe(kind.key, distance, index, kind.question, kind.answer, tuple(candidates),
                            candidates.index(values[0])))
    extra = tuple(filler_utterance(rng) for _ in range(held_back))
    return Dialogue(tuple(utterances), tuple(probes), extra)


@dataclass(frozen=True)
class Tokens:
    """How utterances become ids: plain text, EoU-closed; BOS (when the model has one) opens the dialogue."""

    tokenizer: Any
    eou_id: int
    bos_id: int | None

    def text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def utterance(self, text: str, *, first: bool = False) -> list[int]:
        bos = [self.bos_id] if first and self.bos_id is not None else []
        return [*bos, *self.text(text), self.eou_id]

    def dialogue(self, utterances: Sequence[str]) -> list[list[int]]:
        return [self.utterance(u, first=i == 0) for i, u in enumerate(utterances)]


# --- scoring ----------------------------------------------------------------------------------


def _crop(cache: Any, length: int) -> None:
    """Drop entries fed after ``length`` (uncommitted ones: no ``compress`` ran since)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def continuation_logprobs(
    model: Any, cache: Any, logits: torch.Tensor, prefix: Sequence[int], options: Sequence[Sequence[int]]
) -> list[float]:
    """Summed log p(option | the memory in ``cache``, then ``prefix``), one per option.

    logits: (1, V), the next-token logits after the last token the cache took. ``prefix`` is
    fed but not scored; ``cache`` is left as it was.
    """
    if any(len(option) == 0 for option in options):
        raise ValueError("every option needs at least one token")
    device = model.device
    start = cache.get_seq_length()
    if prefix:
        logits = prefill(model, torch.tensor([list(prefix)], device=device), cache)  # (1, V)
    base = cache.get_seq_length()
    first = torch.log_softmax(logits[0].float(), dim=-1)  # (V,)
    scores = []
    for option in options:
        total = float(first[int(option[0])])
        if len(option) > 1:
            ids = torch.tensor([list(option[:-1])], device=device)  # (1, L-1)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True,
                        position_ids=position_ids_after(cache, ids.shape[1], device))
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)  # (L-1, V)
            targets = torch.tensor(list(option[1:]), device=logprobs.device)[:, None]  # (L-1, 1)
            total += float(logprobs.gather(1, targets).sum())
            _crop(cache, base)
        scores.append(total)
    _crop(cache, start)
    return scores


@torch.inference_mode()
def _reply(model: Any, logits: torch.Tensor, cache: Any, tokens: int) -> list[int]:
    """Greedy-decode ``tokens`` tokens (stop tokens ignored: a fixed amount of work), feeding each,
    as the app decodes: on CUDA through ``graph_decode``'s captured steps."""
    steps = DecodeSteps(model, cache, tokens)
    reply = []
    try:
        for _ in range(tokens):
            token = logits.argmax(dim=-1, keepdim=True)  # (1, V) -> (1, 1)
            reply.append(int(token))
            logits = steps(token)  # (1, V)
    finally:
        steps.finish()
    return reply


# --- memory policies --------------------------------------------------------------------------


class DenseMemory:
    """The whole history, re-read each turn; the oldest utterances go once it outgrows the context.

    Probes reuse one prefill of the history while it only grows at the end, which gives the
    same numbers as re-reading it each time, minus float rounding.
    """

    def __init__(self, label: str, model: Any, context: int, bos_id: int | None, bytes_per_token: int) -> None:
        self.label, self.model, self.context, self.bos_id = label, model, int(context), bos_id
        self.bytes_per_token = bytes_per_token
        self.utterances: list[list[int]] = []  # ids of each utterance, BOS excluded
        self._cache: Any = None
        self._cached: list[int] = []
        self._logits: torch.Tensor | None = None

    def add(self, ids: Sequence[int]) -> None:
        ids = list(ids)
        if not self.utterances and self.bos_id is not None and ids[:1] == [self.bos_id]:
            ids = ids[1:]  # BOS is kept apart: truncation never drops it
        self.utterances.append(ids)

    def fork(self) -> DenseMemory:
        other = DenseMemory(self.label, self.model, self.context, self.bos_id, self.bytes_per_token)
        other.utterances = list(self.utterances)
        return other

    @property
    def tokens(self) -> int:
        """Tokens of the whole history, untruncated."""
        return sum(map(len, self.utterances)) + (self.bos_id is not None)

    def window(self, reserve: int = DENSE_RESERVE) -> list[int]:
        """BOS + the newest whole utterances that fit ``context - reserve`` tokens."""
        bos = [] if self.bos_id is None else [self.bos_id]
        budget = self.context - reserve - len(bos)
        kept: list[list[int]] = []
        for ids in reversed(self.utterances):
            if len(ids) > budget:
                if not kept and budget > 0:  # one utterance longer than the context: keep its end
                    kept.append(ids[-budget:])
                break
            kept.append(ids)
            budget -= len(ids)
        return bos + [t for ids in reversed(kept) for t in ids]

    def _state(self) -> tuple[Any, torch.Tensor]:
        window = self.window()
        if self._cache is not None and window[: len(self._cached)] == self._cached:
            if len(window) > len(self._cached):  # the history grew at the end: read only the new part
                new = torch.tensor([window[len(self._cached):]], device=self.model.device)  # (1, new)
                self._logits = prefill(self.model, new, self._cache)
        else:  # first read, or the window moved on: read it all again
            self._cache = new_cache(self.model)
            self._logits = prefill(self.model, torch.tensor([window], device=self.model.device), self._cache)
        self._cached = window
        return self._cache, self._logits

    def answer_logprobs(self, question: Sequence[int], answer: Sequence[int], options: Sequence[Sequence[int]]):
        """Scores of ``options`` after the history, the question utterance and the answer opener."""
        cache, _ = self._state()
        base = cache.get_seq_length()
        logits = prefill(self.model, torch.tensor([list(question)], device=self.model.device), cache)  # (1, V)
        scores = continuation_logprobs(self.model, cache, logits, answer, options)
        _crop(cache, base)
        return scores

    def sequence_logprob(self, ids: Sequence[int]) -> float:
        """log p(ids) as the next utterance; nothing is kept."""
        cache, logits = self._state()
        return continuation_logprobs(self.model, cache, logits, [], [ids])[0]

    def kv_bytes(self) -> int:
        """What re-reading the (truncated) history holds, from the model config and dtype."""
        return len(self.window()) * self.bytes_per_token

    @torch.inference_mode()
    def turn(self, user: Sequence[int], reply_tokens: int) -> None:
        """One app turn: re-read the truncated history + the user utterance, then decode a reply."""
        ids = torch.tensor([[*self.window(), *user]], device=self.model.device)  # (1, T)
        cache = new_cache(self.model)
        _reply(self.model, prefill(self.model, ids, cache), cache, reply_tokens)


class CacheMemory:
    """A compressing cache kept between utterances: each utterance is read once, then ``compress``."""

    def __init__(self, label: str, model: Any, make_cache: Callable[[], Any], eou_id: int) -> None:
        self.label, self.model, self.eou_id = label, model, eou_id
        self.cache = make_cache()
        self._logits: torch.Tensor | None = None  # next-token logits after the last utterance

    def add(self, ids: Sequence[int]) -> None:
        self._logits = prefill(self.model, torch.tensor([list(ids)], device=self.model.device), self.cache)
        self.cache.compress(ids)

    def fork(self) -> CacheMemory:
        other = copy.copy(self)
        other.cache = copy.deepcopy(self.cache)
        return other

    def answer_logprobs(self, question: Sequence[int], answer: Sequence[int], options: Sequence[Sequence[int]]):
        """Scores of ``options`` after the question utterance (fed and compressed on a copy) and the opener."""
        branch = self.fork()
        branch.add(question)
        return continuation_logprobs(self.model, branch.cache, branch._logits, answer, options)

    def sequence_logprob(self, ids: Sequence[int]) -> float:
        """log p(ids) as the next utterance; nothing is kept."""
        return continuation_logprobs(self.model, self.cache, self._logits, [], [ids])[0]

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    @torch.inference_mode()
    def turn(self, user: Sequence[int], reply_tokens: int) -> None:
        """One app turn: read the user utterance, compress, decode a reply, close it with the EoU, compress."""
        self.add(user)
        reply = _reply(self.model, self._logits, self.cache, reply_tokens)
        prefill(self.model, torch.tensor([[self.eou_id]], device=self.model.device), self.cache)  # (1, 1)
        self.cache.compress([*reply, self.eou_id])


Memory = DenseMemory | CacheMemory


@dataclass(frozen=True)
class Policy:
    """A named way to build a fresh memory for one dialogue."""

    label: str
    build: Callable[[], Memory]


def _cache_policy(label: str, model: Any, make_cache: Callable[[], Any], eou: int) -> Policy:
    return Policy(label, lambda: CacheMemory(label, model, make_cache, eou))


def make_policies(base: Any, tokens: Tokens, context: int, llm: StreamingLLMConfig,
                  trained: Sequence[tuple[str, Any]] = (), dtype: torch.dtype | None = None,
                  positions: Sequence[str] = ("compressed",), distance_caps: Sequence[int] = (),
                  app_only: bool = False) -> list[Policy]:
    """dense, then streaming-llm and streaming-dialogue under each position rule in ``positions``.

    ``base`` runs every row; each ``(name, model)`` in ``trained`` (a model with a memory
    adapter) adds trained streaming-dialogue rows, "trained NAME" (plain "trained" when the
    name is empty). ``dtype``: what the KV cache holds (default: the model's). Each cap in
    ``distance_caps`` adds streaming-dialogue rows under the distance rule capped there rather
    than at the context: every key then sits at most that far back, whatever the dialogue's
    length, so a model trained on sequences that long reads only distances it was trained on.
    (The app caps the distance rule at half a loaded memory adapter's reach: ``memory_reach``.)
    ``app_only`` keeps, of the streaming-dialogue rows, only the caches the app builds: untrained
    under each rule, trained at the caps (or under the rules when there is no cap), so that a long
    probe spends its time on the rows that answer "does the trained app beat the untrained one".
    """
    if not positions or any(rule not in POSITION_RULES for rule in positions):
        raise ValueError(f"positions must be some of {POSITION_RULES}; got {positions!r}")
    eou, bos = tokens.eou_id, tokens.bos_id
    per_token = kv_bytes_per_token(base, dtype or base.dtype)
    policies = [Policy("dense", lambda: DenseMemory("dense", base, context, bos, per_token))]
    models = [("", base)] if not trained else [
        (" untrained", base), *((f" trained {name}".rstrip(), model) for name, model in trained)]
    def dialogue_rows(tag: str, rope: Positions, models: Sequence[tuple[str, Any]]) -> list[Policy]:
        return [_cache_policy(f"streaming-dialogue{name} ({tag})", model,
                              lambda: StreamingDialogueCache(eou, bos, positions=rope), eou) for name, model in models]

    uncapped, capped = models, models
    if app_only and distance_caps:  # the app caps trained caches only
        uncapped, capped = models[:1], models[1:]
    for rule in positions:
        tag = f"{rule} pos"
        rope = memory_positions(rule, base, context)  # as the app builds them with no adapter
        policies.append(_cache_policy(f"streaming-llm {llm.sink_tokens}+{llm.window} ({tag})", base,
                                      lambda r=rope: StreamingLLMCache(llm, positions=r), eou))
        policies += dialogue_rows(tag, rope, uncapped)
    for cap in distance_caps:
        rope = Positions.for_model("distance", base, max_distance=cap)
        policies += dialogue_rows(f"distance pos, cap {cap}", rope, capped)
    return policies


def app_distance_caps(base: Any, context: int, trained: Sequence[Any]) -> tuple[int, ...]:
    """The distance caps the app puts on the StreamingDialogue caches of the ``trained`` models
    (``LoadedModel``s with a memory adapter; ``memory.memory_positions``), less the context's
    own cap, which the plain distance rows already have. Passed as ``distance_caps``, they make the
    capped rows the app's very caches."""
    plain = memory_positions("distance", base, context).max_distance
    caps = {memory_positions("distance", base, context, memory_reach(t)).max_distance for t in trained}
    return tuple(sorted(caps - {plain}))


# --- the measurements -------------------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_recall(policies: Sequence[Policy], tokens: Tokens, distances: Sequence[int], trials: int,
               seed: int, kinds: Sequence[FactType] = FACT_TYPES,
               seconds: float | None = None) -> dict[str, dict[int, list[bool]]]:
    """For each policy and distance, whether the true value scored highest, one entry per trial.

    The facts asked about are of ``kinds`` (all ten types by default). With ``seconds``, no
    trial is begun that the last one's time says would end past that limit: fewer trials, but
    every row has the same ones.
    """
    hits: dict[str, dict[int, list[bool]]] = {p.label: {d: [] for d in distances} for p in policies}
    began, last = time.perf_counter(), 0.0
    for trial in range(trials):
        if seconds is not None and trial and time.perf_counter() - began + last > seconds:
            logger.info("recall: stopping after %d of %d trials, at the %.0f s limit", trial, trials, seconds)
            break
        trial_start = time.perf_counter()
        dialogue = build_dialogue(seed * 1_000_003 + trial, distances, kinds=kinds)
        encoded = tokens.dialogue(dialogue.utterances)
        for policy in policies:
            start = time.perf_counter()
            memory = policy.build()
            for ids in encoded:
                memory.add(ids)
            for probe in dialogue.probes:
                scores = memory.answer_logprobs(tokens.utterance(probe.question), tokens.text(probe.answer),
                                                [tokens.text(" " + c) for c in probe.candidates])
                hits[policy.label][probe.distance].append(max(range(len(scores)), key=scores.__getitem__)
                                                          == probe.correct)
            # The hits so far go in the log too, so a run cut short by a time limit still tells them.
            logger.info("recall trial %d/%d, %s: %d utterances in %.1f s; hits so far %s", trial + 1, trials,
                        policy.label, len(encoded), time.perf_counter() - start,
                        " ".join(f"d={d}:{sum(h)}/{len(h)}" for d, h in hits[policy.label].items()))
        last = time.perf_counter() - trial_start
    return hits


@dataclass
class LongRun:
    """What the lockstep long dialogue measured, per policy label and checkpoint turn."""

    kv_bytes: dict[str, dict[int, int]] = field(default_factory=dict)
    dense_untruncated: dict[int, int] = field(default_factory=dict)
    perplexity: dict[str, dict[int, float]] = field(default_factory=dict)
    seconds: dict[str, dict[int, list[float]]] = field(default_factory=dict)


def run_long(policies: Sequence[Policy], tokens: Tokens, turns: Sequence[int], seed: int, held_back: int,
             repeats: int, reply_tokens: int) -> LongRun:
    """Feed one long dialogue to every policy in lockstep; measure at each checkpoint in ``turns``."""
    turns = sorted(set(turns))
    timed_at = {turns[0], turns[-1]}
    per_check = held_back + repeats + 1  # held-back utterances scored, then users of the timed turns
    dialogue = build_dialogue(seed * 1_000_003 + 999_983, (), length=turns[-1], held_back=per_check * len(turns))
    memories = [p.build() for p in policies]
    result = LongRun()
    start = time.perf_counter()
    for turn, ids in enumerate(tokens.dialogue(dialogue.utterances), start=1):
        for memory in memories:
            memory.add(ids)
        if turn % 100 == 0:
            logger.info("long dialogue: %d/%d utterances (%.0f s)", turn, turns[-1], time.perf_counter() - start)
        if turn not in turns:
            continue
        extra = dialogue.held_back[turns.index(turn) * per_check:][:per_check]
        scored = [tokens.utterance(u) for u in extra[:held_back]]
        n_tokens = sum(map(len, scored))
        dense = next(m for m in memories if isinstance(m, DenseMemory))
        result.dense_untruncated[turn] = dense.tokens * dense.bytes_per_token
        for memory in memories:
            result.kv_bytes.setdefault(memory.label, {})[turn] = memory.kv_bytes()
            nll = -sum(memory.sequence_logprob(ids) for ids in scored)
            result.perplexity.setdefault(memory.label, {})[turn] = math.exp(nll / n_tokens)
        logger.info("turn %d: KV bytes and perplexity done", turn)
        if turn in timed_at:
            users = [tokens.utterance(u) for u in extra[held_back:]]
            for memory in memories:  # warm-up, untimed: first calls pay for allocation
                memory.fork().turn(users[-1], reply_tokens)
            for user in users[:repeats]:
                for memory in memories:
                    branch = memory.fork()
                    _sync()
                    begin = time.perf_counter()
                    branch.turn(user, reply_tokens)
                    _sync()
                    result.seconds.setdefault(memory.label, {}).setdefault(turn, []).append(
                        time.perf_counter() - begin)
            logger.info("turn %d: latency done", turn)
    return result


def measure(policies: Sequence[Policy], tokens: Tokens, config: BenchConfig) -> dict[str, Any]:
    """Run the long dialogue and recall, as ``config.parts`` asks; return the figures as JSON-ready
    dicts (keys: config, and long and/or recall).

    The long dialogue goes first: it holds the size and latency figures, and recall at far
    distances is the part a time limit is likeliest to cut short.
    """

    def by_turn(cells: dict[int, Any]) -> dict[str, Any]:
        return {str(t): v for t, v in cells.items()}

    figures: dict[str, Any] = {"config": asdict(config)}
    if "long" in config.parts:
        long = run_long(policies, tokens, config.turns, config.seed, config.held_back, config.repeats,
                        config.reply_tokens)
        figures["long"] = {
            "kv_bytes": {label: by_turn(cells) for label, cells in long.kv_bytes.items()},
            "dense_untruncated": by_turn(long.dense_untruncated),
            "perplexity": {label: by_turn(cells) for label, cells in long.perplexity.items()},
            "seconds": {label: by_turn(cells) for label, cells in long.seconds.items()},
        }
    if "recall" in config.parts:
        hits = run_recall(policies, tokens, config.distances, config.trials, config.seed,
                          seconds=config.recall_seconds)
        figures["recall"] = {label: by_turn(cells) for label, cells in hits.items()}
    return figures


# --- reporting --------------------------------------------------------------------------------


def _kib(size: int) -> str:
    return f"{size / 1024:,.0f} KiB" if size < 10 * 1024 * 1024 else f"{size / 1024 / 1024:,.1f} MiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def report(summary: dict[str, Any]) -> str:
    """The readable tables for ``summary`` (what ``--json`` writes)."""
    head = f"model: {summary['model']} on {summary['device']} ({summary['dtype']}); context {summary['context']}"
    out = [f"{head}; KV {summary['kv_bytes_per_token']} B/token"]
    if "recall" in summary:
        out.append(_recall_report(summary))
    if "long" in summary:
        out.append(_long_report(summary))
    return "\n".join(out)


def _recall_report(summary: dict[str, Any]) -> str:
    from personalign.evaluation import wilson_interval

    out = []
    recall = summary["recall"]
    distances = summary["config"]["distances"]
    trials = max((len(hits) for cells in recall.values() for hits in cells.values()), default=0)
    out.append(f"\nRecall: multiple choice of {CANDIDATES} (chance 25%), {trials} trials "
               "per cell; accuracy [95% Wilson]")
    rows = []
    for label, cells in recall.items():
        row = [label]
        for d in distances:
            hits = cells[str(d)]
            low, high = wilson_interval(sum(hits), len(hits))
            row.append(f"{sum(hits) / len(hits):.2f} [{low:.2f}, {high:.2f}]")
        rows.append(row)
    out.append(_table(["policy", *(f"d={d}" for d in distances)], rows))
    return "\n".join(out)


def _long_report(summary: dict[str, Any]) -> str:
    out = []
    long = summary["long"]
    turns = summary["config"]["turns"]
    out.append(f"\nKV cache held after N utterances ({summary['dtype']})")
    rows = [[label, *(_kib(cells[str(t)]) for t in turns)] for label, cells in long["kv_bytes"].items()]
    rows.append(["dense, untruncated", *(_kib(long["dense_untruncated"][str(t)]) for t in turns)])
    out.append(_table(["policy", *(f"N={t}" for t in turns)], rows))

    out.append(f"\nPerplexity of held-back next utterances ({summary['config']['held_back']} per checkpoint)")
    rows = [[label, *(f"{cells[str(t)]:.1f}" for t in turns)] for label, cells in long["perplexity"].items()]
    out.append(_table(["policy", *(f"N={t}" for t in turns)], rows))

    first, last = str(turns[0]), str(turns[-1])
    out.append(f"\nOne turn (user utterance + {summary['config']['reply_tokens']}-token reply), median of "
               f"{summary['config']['repeats']}, side by side; seconds count only on this machine")
    medians = {label: {t: statistics.median(v) for t, v in cells.items()} for label, cells in long["seconds"].items()}
    dense = medians.get("dense", {})
    rows = []
    for label, cells in medians.items():
        rows.append([label, f"{cells[first]:.3f}", f"{cells[last]:.3f}", f"{cells[last] / cells[first]:.2f}x",
                     f"{dense[first] / cells[first]:.2f}x", f"{dense[last] / cells[last]:.2f}x"])
    out.append(_table(["policy", f"s @{first}", f"s @{last}", f"@{last} / @{first}",
                       f"dense / policy @{first}", f"dense / policy @{last}"], rows))
    return "\n".join(out)


# --- the edge: arguments ------------------------------------------------------------------------


def _model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --quantize and --threads, as the model benchmarks take them."""
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in re.split(r"[,\s]+", text.strip()) if v)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas; got {text!r}") from exc
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1; got {text!r}")
    return values


def _some_of(choices: Sequence[str], text: str) -> tuple[str, ...]:
    picked = tuple(dict.fromkeys(r for r in re.split(r"[,\s]+", text.strip()) if r))
    if not picked or any(r not in choices for r in picked):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)}; got {text!r}")
    return picked


def _rules(text: str) -> tuple[str, ...]:
    return _some_of(POSITION_RULES, text)


def _parts(text: str) -> tuple[str, ...]:
    return _some_of(PARTS, text)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure; the defaults finish in minutes on a CPU (a GPU run takes larger ones)."""

    distances: tuple[int, ...] = (1, 10, 100)
    trials: int = 3
    seed: int = 0
    turns: tuple[int, ...] = (10, 100, 1000)
    held_back: int = 4
    repeats: int = 2
    reply_tokens: int = 16
    sink_tokens: int = 4
    window: int = 256
    positions: tuple[str, ...] = POSITION_RULES
    parts: tuple[str, ...] = PARTS
    recall_seconds: float | None = None  # no recall trial is begun that would end past this

    def __post_init__(self) -> None:
        if not self.parts or any(part not in PARTS for part in self.parts):
            raise ValueError(f"parts must be some of {PARTS}")
        build_dialogue(0, self.distances)  # raises on bad distances
        for name in ("trials", "held_back", "repeats", "reply_tokens", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.seed < 0 or not self.turns or min(self.turns) < 1:
            raise ValueError("seed must be >= 0 and turns whole numbers >= 1")
        StreamingLLMConfig(self.sink_tokens, self.window)
        if not self.positions or any(rule not in POSITION_RULES for rule in self.positions):
            raise ValueError(f"positions must be some of {POSITION_RULES}")


def _load(args: argparse.Namespace) -> tuple[Any, list[tuple[str, Any]]]:
    """The base model, and (name, model with it applied) for each ``--adapter``.

    One adapter keeps the plain "trained" label; several are told apart by folder name.
    """
    from personalign.models import ModelConfig, load_model

    base = load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize))
    adapters = [Path(a) for a in args.adapter or ()]
    if len({a.name for a in adapters}) < len(adapters):
        raise SystemExit("error: --adapter folders must have different names (they label the rows)")
    # Only passed when given, so the script runs on a ModelConfig without the option too.
    return base, [("" if len(adapters) == 1 else a.name,
                   load_model(ModelConfig(model=args.model, device=args.device, quantize=args.quantize, adapter=a)))
                  for a in adapters]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = BenchConfig()
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", action="append", default=None,
                        help="a LoRA from train-memory: adds trained StreamingDialogue rows (repeat to compare several)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quantize", default="auto")
    parser.add_argument("--distances", type=_ints, default=defaults.distances)
    parser.add_argument("--trials", type=int, default=defaults.trials)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--turns", type=_ints, default=defaults.turns,
                        help="checkpoints of the long dialogue; latency at the first and last")
    parser.add_argument("--held-back", type=int, default=defaults.held_back)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--reply-tokens", type=int, default=defaults.reply_tokens)
    parser.add_argument("--sinks", type=int, default=defaults.sink_tokens)
    parser.add_argument("--window", type=int, default=defaults.window)
    parser.add_argument("--positions", type=_rules, default=POSITION_RULES,
                        help="position rules of the caches, comma-separated: compressed, slot, distance (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--app-only", action="store_true",
                        help="with --adapter, only the app's caches: untrained uncapped, trained at the app's cap")
    parser.add_argument("--parts", type=_parts, default=PARTS,
                        help="what to measure, comma-separated: long (KV, perplexity, latency), recall (default: both)")
    parser.add_argument("--recall-seconds", type=float, default=None,
                        help="begin no recall trial that would end past this many seconds (fewer trials)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    positions = args.positions
    config = BenchConfig(args.distances, args.trials, args.seed, args.turns, args.held_back, args.repeats,
                         args.reply_tokens, args.sinks, args.window, positions, args.parts, args.recall_seconds)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN attention costs ~2 ms of CPU per call there

    from personalign.engine import Engine

    base, trained = _load(args)
    tokens = Tokens(base.tokenizer, base.eou_token_id, base.tokenizer.bos_token_id)
    context = Engine(base).max_context()
    # Under the distance rule, trained rows at the cap the app sets for each adapter too.
    caps = app_distance_caps(base.model, context, [t for _, t in trained]) if "distance" in config.positions else ()
    policies = make_policies(base.model, tokens, context, StreamingLLMConfig(config.sink_tokens, config.window),
                             [(name, t.model) for name, t in trained], base.dtype, config.positions, caps,
                             app_only=args.app_only)
    logger.info("policies: %s", ", ".join(p.label for p in policies))

    summary = {
        "model": base.name + "".join(f" + adapter {Path(a).name}" for a in args.adapter or ()),
        "device": str(base.device),
        "dtype": str(base.dtype).removeprefix("torch."),
        "context": context,
        "kv_bytes_per_token": kv_bytes_per_token(base.model, base.dtype),
        "format": "BOS u1 EoU u2 EoU ... (plain text, EoU = end-of-turn token)",
        **measure(policies, tokens, config),
    }
    print(report(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
        logger.info("wrote %s", args.json)
    return summary


if __name__ == "__main__":
    main()
