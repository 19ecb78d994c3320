"""The `python -m personalign` command line: info, a terminal chat, user accounts, eval, and training.

Argument parsing lives here and in app.py only; both share the model and data flags
defined below, and hand the core frozen configs. Later capabilities add subcommands here.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import storage
from personalign.engine import Engine
from personalign.errors import UserError
from personalign.evaluation import MODES, PROFILE_SOURCES
from personalign.generation import GenerationConfig
from personalign.memory import MemoryPolicy
from personalign.memory_training import (
    BUILT_IN_SOURCES,
    LOSS_ON,
    METHODS,
    SYNTHETIC,
    MemoryTrainingConfig,
    load_dialogues,
    train_memory,
)
from personalign.models import (
    DEVICE_CHOICES,
    QUANTIZE_CHOICES,
    ModelConfig,
    ModelLoadError,
    check_adapter_folder,
    load_model,
)
from personalign.persona import Persona, loads
from personalign.preference_training import KINDS as PREFERENCE_KINDS
from personalign.preference_training import PreferenceTrainingConfig
from personalign.prompts import Mode, build_messages

log = logging.getLogger("personalign")

DB_NAME = "personalign.db"


def default_data_dir() -> Path:
    return Path(os.environ.get("PERSONALIGN_DATA", Path.home() / ".local" / "share" / "personalign"))


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded",
                        help="Hugging Face model id or local folder; 'embedded' is the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="auto",
                        help="auto: 4-bit NF4 on CUDA, full precision on CPU")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where the converted embedded model is kept")
    parser.add_argument("--adapter", type=Path, default=None,
                        help="LoRA adapter folder to apply on top of the model (e.g. written by train-memory)")


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="folder for the SQLite database (default $PERSONALIGN_DATA or ~/.local/share/personalign)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(model=args.model, quantize=args.quantize, device=args.device, cache_dir=args.cache_dir,
                       adapter=args.adapter)


def open_database(args: argparse.Namespace) -> storage.Database:
    return storage.Database.open((args.data_dir or default_data_dir()) / DB_NAME)


def load_engine(args: argparse.Namespace) -> Engine:
    log.info("loading model %s (first use of the embedded model converts it once, about a minute)", args.model)
    return Engine(load_model(model_config(args)))


def cmd_info(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    info = {k: str(v) for k, v in engine.info().items()}
    db = open_database(args)
    info["database"] = str(db.path)
    db.close()
    print(json.dumps(info, indent=2))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    persona = loads(args.persona.read_bytes()) if args.persona else Persona()
    mode = Mode(args.mode)
    policy = MemoryPolicy(args.memory)
    if args.persona_strength and policy is not MemoryPolicy.DENSE:
        raise UserError("--persona-strength needs --memory dense (it compares two full prompts)")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                              persona_strength=args.persona_strength)
    engine = load_engine(args)
    # A streaming memory holds the earlier turns in the KV cache; dense re-sends the history.
    memory = None if policy is MemoryPolicy.DENSE else engine.empty_memory(policy)
    history: list[dict[str, str]] = []
    print(f"Chatting with {engine.info()['name']} in mode {mode.value}, {policy.value} memory. "
          "Empty line or Ctrl-D to quit.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        if memory is None:
            plain = build_messages(Mode.NONE, None, history, text) if mode is not Mode.NONE else None
            tokens = engine.stream(build_messages(mode, persona, history, text), config, unconditioned=plain)
        else:
            tokens = engine.stream_turn(memory, build_messages(mode, persona, [], text), config)
        reply = ""
        print("bot> ", end="", flush=True)
        for reply_so_far in tokens:
            print(reply_so_far[len(reply):], end="", flush=True)
            reply = reply_so_far
        print()
        if memory is not None and tokens.stats is not None and tokens.stats.memory is not None:
            meter = tokens.stats.memory
            log.info("memory: %s cached tokens, %s KV bytes", f"{meter.cached_tokens:,}", f"{meter.kv_bytes:,}")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
    return 0


def cmd_user_add(args: argparse.Namespace) -> int:
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
    db = open_database(args)
    try:
        with db.session() as s:
            storage.create_user(session=s, username=args.name, password=password)
    except ValueError as err:
        raise UserError(str(err)) from err
    finally:
        db.close()
    print(f"user {args.name!r} created")
    return 0


def read_records(path: Path) -> list:
    """The AlignX records in a benchmark JSON file, or a UserError that says what is wrong with it."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise UserError(f"data file not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise UserError(f"{path} must hold a non-empty JSON list of AlignX records")
    return records


def cmd_eval(args: argparse.Namespace) -> int:
    from personalign.evaluation import (
        accuracy_by_group,
        evaluate_modes,
        parse_selection,
    )

    records = read_records(args.data)
    if args.limit is not None and args.records is not None:
        raise UserError("give --limit or --records, not both")
    if args.limit is not None:
        if args.limit < 1:
            raise UserError("--limit must be at least 1")
        selection = list(range(min(args.limit, len(records))))
    else:
        selection = parse_selection(args.records or "all", len(records))
    records = [records[i] for i in selection]
    modes = list(MODES) if args.mode == "all" else [args.mode]
    engine = load_engine(args)

    def progress(done: int, total: int) -> None:
        # One rewritten counter line on stderr, so stdout holds only the results.
        print(f"\r{done}/{total} records", end="\n" if done == total else "", file=sys.stderr, flush=True)

    if args.profile != "given" and {"pba", "contrast"} & set(modes):
        log.info("PBA profiles inferred from each record's behaviour by the %s inferrer", args.profile)
    results = evaluate_modes(records, engine, modes, progress=progress, profile_source=args.profile)
    if args.out:
        with args.out.open("w", encoding="utf-8") as out:
            for mode, result in results.items():
                for row in result.records:
                    # The index in the data file, not in the selection, so lines can be matched to records.
                    out.write(json.dumps({"mode": mode, **row.to_dict(), "index": selection[row.index]}) + "\n")
    print(f"{'mode':<10} {'n':>5} {'accuracy':>9}  95% Wilson CI")
    for mode, result in results.items():
        print(f"{mode:<10} {result.n:>5} {result.accuracy:>9.3f}  [{result.ci_low:.3f}, {result.ci_high:.3f}]")
    if args.group_by:
        labels = [str(r.get(args.group_by, "(none)")) if isinstance(r, dict) else "(none)" for r in records]
        print(f"\nby {args.group_by}:")
        for mode, result in results.items():
            for label, group in accuracy_by_group(result, labels).items():
                print(f"{mode:<10} {group.n:>5} {group.accuracy:>9.3f}  [{group.ci_low:.3f}, {group.ci_high:.3f}]  "
                      f"{label}")
    inferred = [m for m, r in results.items() if r.profile_source not in (None, "given")]
    if inferred:
        # Said under the table, so two runs' tables can be told apart; a given-profile table is unchanged.
        print(f"{' and '.join(inferred)}: profile inferred from behaviour by {args.profile}")
    return 0


def cmd_train_memory(args: argparse.Namespace) -> int:
    if args.adapter is not None:
        raise UserError("train-memory trains a new adapter on the base model; leave out --adapter")
    config = MemoryTrainingConfig(method=args.method, max_steps=args.steps, lr=args.lr, rank=args.rank,
                                  samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                                  max_tokens=args.max_tokens, epochs=args.epochs, loss_on=args.loss_on,
                                  modules=tuple(m.strip() for m in args.modules.split(",") if m.strip()))
    source = args.data if args.data in BUILT_IN_SOURCES else Path(args.data)
    load_dialogues(source, config)  # read once before the model loads: a bad file fails in a second, not a minute
    if args.init is not None:
        check_adapter_folder(args.init)
    log.info("loading model %s", args.model)
    loaded = load_model(model_config(args))

    def progress(step: int, total: int, loss: float) -> None:
        if step % max(1, total // 20) == 0 or step == total:  # about twenty lines, whatever the run's length
            print(f"step {step}/{total}  loss {loss:.4f}", file=sys.stderr, flush=True)

    report = train_memory(loaded, source, config, args.out, progress=progress, start_from=args.init)
    held = "held-out" if report.probe_held_out else "trained-on"
    print(f"trained {config.method} memory adapter on {loaded.name}: {report.steps} steps over "
          f"{report.train_samples} sequences in {report.seconds:.1f} s ({report.steps_per_second:.2f} steps/s)")
    print(f"training loss {report.first_loss:.4f} -> {report.last_loss:.4f}; "
          f"{held} probe loss {report.probe_loss_before:.4f} -> {report.probe_loss_after:.4f}")
    print(f"adapter saved to {report.out_dir}; use it with --adapter {report.out_dir}")
    return 0


def cmd_train_preference(args: argparse.Namespace) -> int:
    from personalign.adapter_training import LoraSettings, top_layers
    from personalign.evaluation import parse_selection
    from personalign.preference_training import preference_pairs, train_preference

    if args.adapter is not None:
        raise UserError("train-preference trains a new adapter on the base model; leave out --adapter")
    records = read_records(args.data)
    held = parse_selection(args.holdout, len(records)) if args.holdout else []
    held_set = set(held)
    train_records = [r for i, r in enumerate(records) if i not in held_set]
    if not train_records:
        raise UserError("--holdout leaves no records to train on")
    # A held-out record's post must not be learnt from another record's history either.
    exclude = {records[i].get("prompt") for i in held if isinstance(records[i], dict)}
    pairs = preference_pairs(train_records, args.kind, history=not args.no_history, exclude_posts=exclude)
    # Checked before the model loads: a bad flag fails in a second, not a minute.
    config = PreferenceTrainingConfig(kind=args.kind, beta=args.beta, lr=args.lr,
                                      epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size,
                                      seed=args.seed, lora=LoraSettings(rank=args.rank))
    if args.top_layers is not None and args.top_layers < 1:
        raise UserError("--top-layers must be at least 1")
    log.info("loading model %s", args.model)
    loaded = load_model(model_config(args))
    if args.top_layers is not None:
        config = replace(config, lora=replace(config.lora, layers=top_layers(loaded.model, args.top_layers)))

    def progress(step: int, total: int, loss: float) -> None:
        if step % max(1, total // 20) == 0 or step == total:
            print(f"step {step}/{total}  loss {loss:.4f}", file=sys.stderr, flush=True)

    report = train_preference(loaded, pairs, config, args.out, progress=progress, run_info={
        "data": args.data.name, "history": not args.no_history, "holdout": args.holdout or "",
        "held_out_records": len(held), "excluded_posts": len(exclude)})
    print(f"trained a DPO preference adapter ({args.kind} prompts) on {loaded.name}: {report.steps} steps over "
          f"{report.train_pairs} pairs from {len(train_records)} records in {report.seconds:.1f} s")
    print(f"DPO loss {report.first_loss:.4f} -> {report.last_loss:.4f}")
    if report.probe_accuracy_before is not None:
        print(f"probe pairs ({report.probe_pairs}, from records not trained on): accuracy "
              f"{report.probe_accuracy_before:.3f} -> {report.probe_accuracy_after:.3f}")
    hint = f" --records {args.holdout}" if args.holdout else ""
    print(f"adapter saved to {report.out_dir}; evaluate it with: eval --adapter {report.out_dir}{hint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m personalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="load the model and print what was loaded, and where data lives")
    add_model_arguments(info)
    add_data_argument(info)
    info.set_defaults(run=cmd_info)
    chat = sub.add_parser("chat", help="chat in the terminal, aligned to a persona JSON file")
    add_model_arguments(chat)
    chat.add_argument("--persona", type=Path, help="persona JSON (AlignX record shape)")
    chat.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.PBA.value)
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--memory", choices=[p.value for p in MemoryPolicy], default=MemoryPolicy.DENSE.value,
                      help="what the model keeps between turns: dense re-reads the history; the streaming "
                           "policies keep a compressed KV cache")
    chat.add_argument("--persona-strength", type=float, default=0.0,
                      help="persona guidance gamma (0 = plain decoding); needs --memory dense")
    chat.set_defaults(run=cmd_chat)
    evaluate = sub.add_parser("eval", help="pairwise preference accuracy on an AlignX benchmark JSON file")
    add_model_arguments(evaluate)
    evaluate.add_argument("--data", type=Path, required=True, help="AlignX benchmark JSON (a list of records)")
    evaluate.add_argument("--mode", choices=[*MODES, "all"], required=True,
                          help="scorer; all runs the four in one pass and prints a table")
    evaluate.add_argument("--limit", type=int, default=None, help="evaluate only the first N records")
    evaluate.add_argument("--records", default=None,
                          help="evaluate these records, e.g. 0:50,300:350 (start:stop ranges and indices)")
    evaluate.add_argument("--out", type=Path, default=None, help="write per-record results here as JSON lines")
    evaluate.add_argument("--group-by", default=None, metavar="KEY",
                          help="also print accuracy per value of this record key (e.g. ground_truth_persona)")
    evaluate.add_argument("--profile", choices=PROFILE_SOURCES, default="given",
                          help="PBA profile for pba and contrast: given = the record's own profile; embedding = "
                               "inferred from the record's UGC and pairwise items by the embedding inferrer")
    evaluate.set_defaults(run=cmd_eval)
    train = sub.add_parser("train-memory",
                           help="train a StreamingDialogue SMR/LMR LoRA adapter so the EoU sinks hold the dialogue")
    add_model_arguments(train)
    train.add_argument("--data", required=True,
                       help=f"'{SYNTHETIC}' (built-in two-person dialogues), 'recall-near' or 'recall-far' (built-in "
                            "facts asked about 1-12 or 1-32 utterances later; train with --method dialogue --loss-on "
                            "replies, near first, then far with --init), or a corpus: text with one utterance a line "
                            'and a blank line between dialogues, or JSONL of {"dialogue": [...]}')
    train.add_argument("--out", type=Path, required=True, help="folder to write the adapter into")
    defaults = MemoryTrainingConfig()
    train.add_argument("--method", choices=METHODS, default=defaults.method,
                       help="smr, lmr, both (the two mixed), dialogue (whole dialogues under the inference mask), "
                            "or all: both, then the dialogue stage, as published")
    train.add_argument("--init", type=Path, default=None, metavar="ADAPTER",
                       help="go on training this memory adapter instead of a fresh LoRA (e.g. --method dialogue "
                            "from a --method both adapter: the published two stages as two runs)")
    train.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over each stage's sequences")
    train.add_argument("--steps", type=int, default=None, help="stop after N optimizer steps (default: the epochs)")
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank")
    train.add_argument("--modules", default=",".join(defaults.modules), metavar="NAMES",
                       help="comma-separated linear layers to adapt in every decoder layer (default: the "
                            "published q_proj,v_proj; add k_proj to let the sinks' keys be trained too)")
    train.add_argument("--loss-on", choices=LOSS_ON, default=defaults.loss_on,
                       help="the dialogue stage's targets: all (every utterance after the first, as published) "
                            "or replies (only utterances answering one that ends in '?')")
    train.add_argument("--samples", type=int, default=defaults.samples,
                       help="dialogues drawn from a built-in --data source")
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="longest training sequence")
    train.set_defaults(run=cmd_train_memory)
    pref = sub.add_parser("train-preference",
                          help="train a DPO LoRA adapter on AlignX records' pairwise choices, persona in the prompt")
    add_model_arguments(pref)
    pref.add_argument("--data", type=Path, required=True, help="AlignX JSON (a list of records) to learn from")
    pref.add_argument("--out", type=Path, required=True, help="folder to write the adapter into")
    pref_defaults = PreferenceTrainingConfig()
    pref.add_argument("--kind", choices=PREFERENCE_KINDS, default=pref_defaults.kind,
                      help="pba: the record's profile in the prompt; raw: no persona (the control)")
    pref.add_argument("--holdout", default=None,
                      help="records never trained on (e.g. 0:50,300:350), nor their posts in any history")
    pref.add_argument("--no-history", action="store_true",
                      help="learn from each record's own pair only, not its pairwise history")
    pref.add_argument("--steps", type=int, default=None, help="stop after N optimizer steps (default: the epochs)")
    pref.add_argument("--epochs", type=int, default=pref_defaults.epochs)
    pref.add_argument("--lr", type=float, default=pref_defaults.lr)
    pref.add_argument("--beta", type=float, default=pref_defaults.beta, help="DPO temperature")
    pref.add_argument("--rank", type=int, default=pref_defaults.lora.rank, help="LoRA rank")
    pref.add_argument("--top-layers", type=int, default=None,
                      help="adapt only the last N decoder layers (faster backward); default all")
    pref.add_argument("--batch-size", type=int, default=pref_defaults.batch_size, help="pairs per optimizer step")
    pref.add_argument("--seed", type=int, default=pref_defaults.seed)
    pref.set_defaults(run=cmd_train_preference)
    user = sub.add_parser("user", help="manage sign-in accounts")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = user_sub.add_parser("add", help="create a user for the app's sign-in")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add_data_argument(add)
    add.set_defaults(run=cmd_user_add)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed command, turning the errors a user can fix into one clear line and exit code 2."""
    try:
        return args.run(args)
    except (UserError, ModelLoadError, storage.DatabaseError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))
