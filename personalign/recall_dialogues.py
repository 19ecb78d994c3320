"""Recall-shaped dialogues: facts stated among small talk, asked about later, answered with the value.

The StreamingDialogue sinks hold an utterance's content even untrained; what the model lacks is
reading it back (``benchmarks/RESULTS.md``: linear probes decode the facts from the sinks, yet
answers through them are near chance). A dialogue here gives that reading a target: small talk,
a few facts stated among it ("My flight number is BA217."), and later a question about each
("What is my flight number?") answered with the fact's value ("Your flight number is BA217.").
Under the StreamingDialogue mask the answer sees the statement only through its EoU, so a loss
on the replies (``memory_training``, ``loss_on="replies"``) can only fall by reading a sink.

``NEAR`` puts each question 1 to 12 utterances after its fact, ``FAR`` 1 to 32; trained near
first and far from there, the sinks were read 100 utterances back on the benchmark (RESULTS).

The module is pure and knows nothing of models or tokens: it makes lists of strings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

TRAIN_SEED = 7_000_003  # training dialogues draw from their own stream, apart from the benchmark's seeds


@dataclass(frozen=True)
class FactType:
    """One kind of fact: how it is stated, asked and answered, and the values it can take."""

    key: str
    statement: str  # "My sister's name is {}."
    question: str
    answer: str  # answer opener; the value follows after a space
    values: tuple[str, ...]


# Small talk that names no fact value and touches no fact's topic, so a question has one answer.
SMALL_TALK = (
    "The weather has been lovely all week.",
    "I finally finished that book about the ocean.",
    "My neighbour planted tomatoes in the garden.",
    "I made soup for lunch today.",
    "The train was late again this morning.",
    "Have you seen the film everyone is talking about?",
    "I think it might rain later this afternoon.",
    "The park was full of people enjoying the sun.",
    "I need to buy some milk and bread on the way home.",
    "We watched the stars from the hill last night.",
    "The coffee at the station is surprisingly good.",
    "I spent the evening fixing the kitchen shelf.",
    "My phone battery keeps running out too quickly.",
    "The museum has a new exhibition about old maps.",
    "I tried to bake a cake but it fell apart.",
    "The cat next door keeps sitting on our fence.",
    "There was a long queue at the post office.",
    "I have been learning to cook rice properly.",
    "The river looked beautiful in the morning light.",
    "I lost my umbrella somewhere in town.",
    "The market sells fresh fish on weekends.",
    "I slept really well last night for a change.",
    "Someone left a bicycle outside the library.",
    "The soup was a bit too salty for me.",
    "I walked along the beach and collected shells.",
    "The new bridge over the river is almost finished.",
    "My plants are growing faster than I expected.",
    "I read an article about bees yesterday.",
    "We had pancakes with honey for breakfast.",
    "The wind knocked over the bins last night.",
    "I want to visit the mountains next summer.",
    "The shop ran out of croissants early.",
    "I have been sneezing all day because of the pollen.",
    "There is a funny noise coming from the fridge.",
    "I finally cleaned out the garage.",
    "The library extended its opening hours.",
    "My shoes got soaked in the puddles.",
    "We stayed up playing cards until midnight.",
    "The apples from the orchard are very sweet.",
    "I forgot to water the herbs on the balcony.",
    "The tea shop downstairs has new cups.",
    "A storm is expected at the weekend.",
    "I watched a documentary about whales.",
    "The printer jammed again this afternoon.",
    "That recipe needs more garlic.",
    "I have a mild headache this evening.",
    "We saw a rainbow over the fields.",
    "The streets were quiet after the holiday.",
    "I should really answer my emails.",
    "The lake froze over for the first time in years.",
)
OPENERS = ("", "", "Honestly, ", "By the way, ", "Anyway, ", "Oh, ", "You know, ", "Well, ")


def filler_utterance(rng: random.Random) -> str:
    """One small-talk utterance, drawn with ``rng``."""
    opener, clause = rng.choice(OPENERS), rng.choice(SMALL_TALK)
    if opener and not clause.startswith("I "):
        clause = clause[0].lower() + clause[1:]
    return opener + clause


# The fact types the built-in recall source states and asks about. The recall benchmark
# (``benchmarks/memory_recall.py``) probes ten others, so what an adapter trained here scores there
# is recall of fact kinds it never saw, as a user's own facts will be. None touches a topic of the
# small talk or of another type (of these or the benchmark's), so every question has one answer.
TRAINING_FACTS: tuple[FactType, ...] = (
    FactType("brother", "My brother's name is {}.", "What is my brother's name?", "Your brother's name is",
             ("Tom", "Leo", "Sam", "Oscar", "Felix", "Hugo", "Ben", "Adam", "Jack", "Noah")),
    FactType("flight", "My flight number is {}.", "What is my flight number?", "Your flight number is",
             ("BA217", "LH904", "AF332", "KL618", "IB275", "SK561", "AY143", "OS786", "TP490", "EI827")),
    FactType("sport", "I play {} on weekends.", "Which sport do I play on weekends?", "You play",
             ("tennis", "football", "golf", "hockey", "rugby", "cricket", "volleyball", "badminton", "squash",
              "baseball")),
    FactType("birthday", "My birthday is in {}.", "When is my birthday?", "Your birthday is in",
             ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October")),
    FactType("food", "My favourite food is {}.", "What is my favourite food?", "Your favourite food is",
             ("pizza", "sushi", "pasta", "curry", "tacos", "paella", "ramen", "lasagne", "risotto", "dumplings")),
    FactType("language", "I am learning {}.", "Which language am I learning?", "You are learning",
             ("German", "Spanish", "Italian", "Japanese", "Korean", "Arabic", "Polish", "Greek", "Turkish", "Dutch")),
    FactType("street", "I live on {}.", "Which street do I live on?", "You live on",
             ("Oak Lane", "Mill Road", "Church Street", "Park Avenue", "High Street", "Elm Close", "Station Road",
              "King Street", "Queens Drive", "Bridge Lane")),
    FactType("doctor", "My doctor is called Dr {}.", "What is my doctor called?", "Your doctor is called Dr",
             ("Patel", "Smith", "Jones", "Khan", "Novak", "Rossi", "Meyer", "Silva", "Kowalski", "Dubois")),
    FactType("trip", "Next year I am travelling to {}.", "Where am I travelling next year?", "You are travelling to",
             ("Japan", "Peru", "Kenya", "Canada", "Norway", "Brazil", "India", "Egypt", "Mexico", "Iceland")),
    FactType("wifi", "The wifi password is {}.", "What is the wifi password?", "The wifi password is",
             ("falcon", "maple", "copper", "velvet", "harbour", "quartz", "meadow", "tiger", "cobalt", "jasmine")),
    FactType("bus", "I take the number {} bus to work.", "Which bus do I take to work?", "You take the number",
             ("12", "45", "7", "88", "23", "31", "56", "9", "74", "19")),
    FactType("daughter", "My daughter is {} years old.", "How old is my daughter?", "Your daughter is",
             ("4", "6", "7", "9", "11", "13", "15", "8", "10", "12")),
    FactType("subject", "I teach {} at the school.", "What subject do I teach?", "You teach",
             ("history", "maths", "biology", "chemistry", "physics", "geography", "music", "art", "drama",
              "economics")),
    FactType("floor", "I live on the {} floor.", "Which floor do I live on?", "You live on the",
             ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh")),
    FactType("allergy", "I am allergic to {}.", "What am I allergic to?", "You are allergic to",
             ("peanuts", "shellfish", "penicillin", "wheat", "eggs", "latex", "soy", "dust", "wasps", "sesame")),
    FactType("wife", "My wife's name is {}.", "What is my wife's name?", "Your wife's name is",
             ("Anna", "Rachel", "Sarah", "Olivia", "Chloe", "Megan", "Hannah", "Lucy", "Zoe", "Ruth")),
    FactType("seat", "My seat number is {}.", "What is my seat number?", "Your seat number is",
             ("14A", "22C", "7F", "31B", "18D", "3E", "26A", "11C", "9B", "40F")),
    FactType("boss", "My boss is called {}.", "What is my boss called?", "Your boss is called",
             ("Harris", "Walker", "Turner", "Hughes", "Lewis", "Carter", "Morgan", "Evans", "Wright", "Parker")),
)


@dataclass(frozen=True)
class RecallShape:
    """How a recall dialogue is laid out."""

    fillers: tuple[int, int]  # fewest, most small-talk utterances, before the questions go in
    facts: int  # facts stated, each asked about and answered once
    max_gap: int  # a question comes 1..max_gap utterances after its fact (other Q&A pairs may sit between)

    def __post_init__(self) -> None:
        if not (isinstance(self.facts, int) and self.facts >= 1):
            raise ValueError(f"facts must be a positive integer; got {self.facts!r}")
        low, high = self.fillers
        if not self.facts + 1 <= low <= high:
            raise ValueError(f"fillers must be fewest,most with fewest >= facts + 1 ({self.facts + 1}: the facts "
                             f"and a question after the last); got {self.fillers!r}")
        if not (isinstance(self.max_gap, int) and self.max_gap >= 1):
            raise ValueError(f"max_gap must be a positive integer; got {self.max_gap!r}")


NEAR = RecallShape(fillers=(12, 24), facts=3, max_gap=12)  # ~250 tokens a dialogue for SmolLM2, at most ~350
FAR = RecallShape(fillers=(24, 32), facts=4, max_gap=32)  # ~390 tokens, at most ~460: still within 512


def recall_dialogue(rng: random.Random, kinds: Sequence[FactType], shape: RecallShape = NEAR) -> tuple[str, ...]:
    """``shape.fillers`` (a range) small-talk utterances, ``shape.facts`` of them replaced by
    statements of different ``kinds``, each asked about and answered 1..``shape.max_gap``
    utterances after it was stated.

    The answer is the question's answer opener and the value. It comes after the question, so
    under the inference mask it sees the statement only through its EoU (and through the
    question, when that follows the statement directly).
    """
    n = rng.randint(*shape.fillers)
    slots: list[tuple[float, str]] = [(float(i), filler_utterance(rng)) for i in range(n)]
    chosen = rng.sample(list(kinds), min(shape.facts, len(kinds)))
    for i, (kind, at) in enumerate(zip(chosen, rng.sample(range(n - 1), len(chosen)))):
        value = rng.choice(kind.values)
        slots[at] = (float(at), kind.statement.format(value))
        asked = min(at + rng.randint(1, shape.max_gap), n) - 0.5 + 0.1 * i  # after utterance at+gap-1, before the next
        slots += [(asked, kind.question), (asked + 0.05, f"{kind.answer} {value}.")]
    return tuple(text for _, text in sorted(slots, key=lambda slot: slot[0]))


def recall_dialogues(count: int, seed: int = 0, kinds: Sequence[FactType] = TRAINING_FACTS,
                     shape: RecallShape = NEAR) -> list[tuple[str, ...]]:
    """``count`` recall dialogues, the same for the same arguments."""
    if count < 1:
        raise ValueError(f"count must be at least 1; got {count}")
    if not kinds:
        raise ValueError("kinds must name at least one fact type")
    rng = random.Random(TRAIN_SEED + seed)
    return [recall_dialogue(rng, kinds, shape) for _ in range(count)]
