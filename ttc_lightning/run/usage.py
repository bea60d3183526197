"""A command line that does not parse, said in one line: jsonargparse's report turned into the option at fault and,
where one is close, what was meant (`--trainer.max_step` -> `--trainer.max_steps`); and the commands `ttc` knows."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import re
import typing
from pathlib import Path

import lightning as L
import yaml

from ttc_lightning.errors import TTCError
from ttc_lightning.run.ending import COMMAND_LINE


def subcommand_parsing() -> str:
    """The subcommand whose command line jsonargparse is parsing (`SUBCOMMAND` when it cannot tell)."""
    try:
        from jsonargparse._common import parent_parser

        return str(getattr(parent_parser.get(), "subcommand", None) or "SUBCOMMAND")
    except (ImportError, AttributeError, LookupError):  # a jsonargparse release without it
        return "SUBCOMMAND"


def one_line_error(message: str, options: list[str], argv: list[str] | tuple[str, ...] = ()) -> str:
    """jsonargparse's `message` about a command line, as one line naming the option, with a suggestion where one of
    `options` (or of the named class's arguments, or of a choice's values) is close to what was given; `argv` is
    the command line, to name the option whose value is missing, and the config file that gave a bad value."""
    line = _one_line(message, options, argv)
    key = re.match(r"--([\w.]+): ", line)
    if key is None or any(a == "--" + key.group(1) or a.startswith(f"--{key.group(1)}=") for a in argv):
        return line
    holder = next((name for name in reversed(config_files(argv)) if _holds(name, key.group(1).split("."))), None)
    return line if holder is None else f"{holder}: {line.removeprefix('--')}"


def _one_line(message: str, options: list[str], argv: list[str] | tuple[str, ...]) -> str:

    def key_before(position: int) -> str:  # "--model.lora." from the nested 'Parser key "..."' lines before it
        return "--" + "".join(k + "." for k in re.findall(r'Parser key "([\w.]+)"', message[:position]))

    required = re.search(r"the following arguments are required: (.*)", message)
    if required:
        prefix = key_before(required.start()).removeprefix("--")  # "model." within a class's report, else ""
        names = [name.strip() for name in required.group(1).split(",")]
        keys = [prefix + name if prefix else name.split(".", 1)[-1] for name in names]  # "fit.data" -> "data"
        if set(keys) >= {"model", "data"}:
            return "no model or data given: give --config FILE (configs/demo.yaml runs on CPU), or --model and --data"
        listed = ", ".join("--" + key for key in keys)
        return f"{listed}: required (not null); give it in a --config file or on the command line"
    command = re.search(r"argument subcommand: invalid choice: '(.*?)'", message)
    if command:
        return _unknown_command(command.group(1))
    if re.match(r'expected "subcommand" to be one of', message):
        return f"no command given; give one of {', '.join(COMMANDS)} (`ttc --help` says what each does)"
    value_missing = re.match(r"argument ([-\w./]+): expected (?:one|at least one) argument", message)
    if value_missing:
        return f"{_option_given(value_missing.group(1), argv)}: expected a value"
    unknown = re.search(
        r"class_path '([\w.]+)':\s+(?:Option '([\w.]+)' is not accepted|unrecognized arguments: --([\w.]+))", message
    )
    if unknown:
        prefix = key_before(unknown.start())
        known = [prefix + name for name in class_options(unknown.group(1))]
        return _unknown(prefix + (unknown.group(2) or unknown.group(3)), known)
    group = re.search(r"class_path '([\w.]+)':.*?Group '(\w+)' does not accept option '(\w+)'", message, re.S)
    if group:
        prefix = key_before(group.start()) + group.group(2) + "."
        return _unknown(prefix + group.group(3), [prefix + f for f in group_fields(group.group(1), group.group(2))])
    not_imported = re.search(
        r"Problem with given class_path '([\w.]+)':\s+((?:module '[\w.]+' has no attribute|No module named) .*)",
        message,
    ) or re.search(r"Expected a dot import path string: ()([A-Za-z_][\w.]*)$", message, re.M)
    if not_imported:
        key = key_before(not_imported.start()).rstrip(".")
        return _class_not_imported(key, not_imported.group(1) or not_imported.group(2))
    choices = re.findall(r"Expected a typing\.Literal\[(.*?)\]", message)
    given = re.findall(r"Got value: (.*)", message) or re.findall(r"Given value: (.*)", message)
    if choices and given:
        allowed = list(dict.fromkeys(v.strip(" '\"") for c in choices for v in c.split(",")))
        key = key_before(message.index("Expected a typing.Literal")).rstrip(".")
        value = given[-1].strip()
        close = [ALIASES[value.lower()]] if ALIASES.get(value.lower()) in allowed else []
        close = close or difflib.get_close_matches(value, allowed, n=1, cutoff=0.6)
        if close:
            return f"{key}: {value!r} is not a choice; did you mean {close[0]}? ({', '.join(allowed)})"
        return f"{key}: {value!r} is not one of {', '.join(allowed)}"
    typed = re.search(r"Expected a <class '(\w+)'>\. Got value: (.*)", message)
    if typed:
        key = key_before(typed.start()).rstrip(".")
        return f"{key}: expected {_article(typed.group(1))} {typed.group(1)}, got {typed.group(2).strip()!r}"
    union = re.search(
        r"Subtypes: \[(.*?)\]\s+Errors:\s+(?:- Expected a <class '\w+'>\s+)+Given value type: .*\n\s*Given value: (.*)",
        message,
    )
    if union:  # an optional int or the like, given something else: "expected an int or null"
        key = key_before(union.start()).rstrip(".")
        kinds = ["null" if k == "NoneType" else k for k in re.findall(r"<class '(\w+)'>", union.group(1))]
        return f"{key}: expected {_article(kinds[0])} {' or '.join(kinds)}, got {union.group(2).strip()!r}"
    not_accepted = re.search(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)
    if not_accepted:  # a key of a config file
        return _unknown_key(not_accepted.group(1), options, argv)
    unrecognized = re.search(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        return _unknown(unrecognized.group(1).split("=")[0], options)
    missing = re.search(r"File does not exist: '(.*?)'", message)
    if missing:
        return _missing_config(Path(missing.group(1)), argv)
    keys = list(dict.fromkeys(re.findall(r'Parser key "([\w.]+)"', message)))  # a nested report repeats its key
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    detail = next((line for line in reversed(lines) if not line.startswith(("Given value", "Expected a <class"))), "")
    detail = re.sub(r'^Parser key "[\w.]+": ', "", detail)
    detail = re.sub(r"\b([Ee]xpected) a (?=[aeiou])", r"\1 an ", detail)  # jsonargparse's "Expected a int"
    return f"--{'.'.join(keys)}: {detail}" if keys else " ".join(lines)


# What a choice is often called elsewhere (PyTorch, Lightning's precision names), when it is not close enough in
# spelling for difflib: `--model.dtype fp16` means float16.
ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}


def _missing_config(path: Path, argv: list[str] | tuple[str, ...]) -> str:
    """A `--config` file that does not exist (as the command line gave it), with the file of its directory whose name
    is closest, if one is."""
    path = next((Path(name) for name in config_files(argv) if Path(name).absolute() == path), path)
    siblings = {p.stem: p.name for p in path.parent.glob("*.y*ml")} if path.parent.is_dir() else {}
    # By the name without its .yaml, which every candidate shares: `nothere` is not close to `patch`.
    close = difflib.get_close_matches(path.stem, list(siblings), n=1, cutoff=0.6)
    return f"--config {path}: no such file" + (f"; did you mean {path.parent / siblings[close[0]]}?" if close else "")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _option_given(option: str, argv: list[str] | tuple[str, ...]) -> str:
    """The option on the command line that argparse reports as `option` ("--model", "-c/--config"): the first
    `--model.beta` without a value after it names it better than the `--model` it was parsed as."""
    names = option.split("/")
    for i, arg in enumerate(argv):
        if "=" in arg or not any(arg == name or arg.startswith(name + ".") for name in names if name.startswith("--")):
            continue
        following = argv[i + 1] if i + 1 < len(argv) else None
        if following is None or re.match(r"--?[A-Za-z_]", following):
            return arg
    return names[-1]


def _unknown_command(given: str) -> str:
    close = difflib.get_close_matches(given, COMMANDS, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? ({', '.join(COMMANDS)})" if close else f"give one of {', '.join(COMMANDS)}"
    return f"unknown command {given!r}; {hint}"


def _class_not_imported(key: str, class_path: str) -> str:
    """`key`'s class_path does not import: the closest of ttc's classes for that key (by class name), else all."""
    known = ttc_classes(key.lstrip("-"))
    what = f"{key}.class_path: cannot import {class_path}"
    names = {path.rpartition(".")[2].lower(): path for path in known}
    close = difflib.get_close_matches(class_path.rpartition(".")[2].lower(), names, n=1, cutoff=0.6)
    if close:
        return f"{what}; did you mean {names[close[0]]}?"
    return f"{what}; ttc's classes for {key}: {', '.join(known)}" if known else what


def config_files(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The files of `--config FILE` and `--config=FILE` in `argv`, in order."""
    given = [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    return given + [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]


def _unknown_key(key: str, options: list[str], argv: list[str] | tuple[str, ...]) -> str:
    """A config file's key that is no option: the file that holds it (the last given), and the closest option."""
    close = difflib.get_close_matches("--" + key, options, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0].removeprefix('--')}?" if close else "; `ttc SUBCOMMAND --help` lists the options"
    holder = next((name for name in reversed(config_files(argv)) if _holds(name, key.split("."))), None)
    return f"{holder or 'a config file'}: unknown key {key}{hint}"


def _holds(path: str, keys: list[str]) -> bool:
    try:
        node = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _unknown(option: str, known: list[str]) -> str:
    if not option.startswith("-"):  # `ttc fit --config c.yaml stray`: a word, not an option
        return f"unexpected argument {option!r}: options start with -- (`ttc SUBCOMMAND --help` lists them)"
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else "; `ttc SUBCOMMAND --help` lists the options"
    return f"unknown option {option}{hint}"


def group_fields(class_path: str, argument: str) -> list[str]:
    """The fields of the dataclass that the constructor argument `argument` of `class_path`'s class takes."""
    module, _, name = class_path.rpartition(".")
    try:
        hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    except (ImportError, AttributeError, ValueError, NameError):
        return []
    kind = hints.get(argument)
    candidates = [kind, *typing.get_args(kind)]
    return next(([f.name for f in dataclasses.fields(c)] for c in candidates if dataclasses.is_dataclass(c)), [])


def init_arguments(class_path: str) -> list[str]:
    """The constructor arguments of the class at `class_path` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for klass in cls.__mro__:  # a subclass that passes **kwargs on takes its bases' arguments too
        parameters = inspect.signature(klass.__init__).parameters
        names += [p for p, v in parameters.items() if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        if not any(v.kind == v.VAR_KEYWORD for v in parameters.values()):
            break
    return list(dict.fromkeys(names))


def class_options(class_path: str) -> list[str]:
    """The options of the class at `class_path`: its constructor arguments, and `ARG.FIELD` for each field of an
    argument that takes a dataclass (`levers.cuda_graph`)."""
    names = init_arguments(class_path)
    return names + [f"{name}.{field}" for name in names for field in group_fields(class_path, name)]


# Where ttc's classes for a class_path option are, and what they derive from.
CLASS_HOMES = {"data": ("ttc_lightning.data", L.LightningDataModule), "model": ("ttc_lightning", L.LightningModule)}


def ttc_classes(key: str) -> list[str]:
    """The import paths of ttc's classes that the `key` option ("data", "model") can name; bases of others left out
    (`TaskDataModule`)."""
    if key not in CLASS_HOMES:
        return []
    home, base = CLASS_HOMES[key]
    module = importlib.import_module(home)
    found = [getattr(module, name) for name in getattr(module, "__all__", [])]
    classes = [c for c in found if isinstance(c, type) and issubclass(c, base)]
    leaves = [c for c in classes if not any(o is not c and issubclass(o, c) for o in classes)]
    return [f"{home}.{c.__name__}" for c in leaves]


SUBCOMMANDS = {
    "fit": "Train the policy with GRPO (resume with --ckpt_path last).",
    "validate": "Evaluate the policy (or a checkpoint: --ckpt_path) on the validation split.",
    "test": "Evaluate the policy (or a checkpoint: --ckpt_path) on the test split.",
    "predict": "Write predictions.jsonl: the policy's completions, answers or patches for the test split.",
}
# Commands run outside LightningCLI (`run`), by the module whose `main(argv)` runs each.
OTHER_COMMANDS = {
    "export": "ttc_lightning.run.export",
    "generate": "ttc_lightning.run.generate",
    "oracle": "ttc_lightning.run.oracle",
}
COMMANDS = (*SUBCOMMANDS, *OTHER_COMMANDS)


# Options whose values are free text, taken as given: jsonargparse reads an option of a class as YAML, in which
# "Fix {cwe}: {func}" is a mapping, so ttc hands each to it as a JSON mapping of the class's arguments.
TEXT_OPTIONS = ("--data.user_template", "--data.system_prompt")


def config_after_subcommand(argv: list[str]) -> list[str]:
    """`ttc -c FILE fit ...` (the `-c/--config` that `ttc --help` shows) as `ttc fit --config FILE ...`: jsonargparse
    reads a config before the subcommand as the top level's, where the subcommand's sections are not accepted."""
    moved: list[str] = []
    while argv and argv[0].split("=")[0] in ("-c", "--config"):
        option, equals, value = argv[0].partition("=")
        if not equals and len(argv) < 2:
            break
        moved += ["--config", value if equals else argv[1]]
        argv = argv[1:] if equals else argv[2:]
    if moved and argv and argv[0] in SUBCOMMANDS:
        return [argv[0], *moved, *argv[1:]]
    return [*moved, *argv]


def nested_help(argv: list[str]) -> list[str]:
    """`argv` with `--model.help ttc_lightning.GRPOModule` put before a `--model.lora.help` (or another option
    class's help) given without it: jsonargparse knows those only within the module's own help, which lists them."""
    for i, arg in enumerate(argv):
        if re.fullmatch(r"--model\.\w+\.help", arg) and not any(a.split("=")[0] == "--model.help" for a in argv):
            return [*argv[:i], "--model.help", "ttc_lightning.GRPOModule", *argv[i:]]
    return argv


def text_as_given(argv: list[str]) -> list[str]:
    """`argv` with `--data.user_template TEXT` (and the other `TEXT_OPTIONS`) written as `--data {"init_args":
    {"user_template": TEXT}}`, which jsonargparse merges into the data module's arguments; `null` stays null."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        option, equals, value = argv[i].partition("=")
        given = equals or i + 1 < len(argv)
        if option in TEXT_OPTIONS and given:
            value = value if equals else argv[i + 1]
            i += 1 if equals else 2
            text = None if value == "null" else value
            group, _, name = option.removeprefix("--").partition(".")
            out += [f"--{group}", json.dumps({"init_args": {name: text}})]
            continue
        out.append(argv[i])
        i += 1
    return out


class ConfigFileError(TTCError):
    """A `--config` file that cannot be read as options: part of a command line that does not parse (status 2)."""

    exit_status = COMMAND_LINE


def check_config_files(argv: list[str]) -> None:
    """Each `--config FILE` must be UTF-8 text and a YAML mapping: the YAML reader's own errors, and jsonargparse's
    for a list, would not say which file."""
    for name in config_files(argv):
        path = Path(name)
        if not path.is_file():
            continue  # a missing file (or a config given inline) is jsonargparse's to report
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigFileError(
                f"--config {name}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigFileError(f"--config {where}: not valid YAML: {problem}") from None
        if content is None:  # jsonargparse would say "Unexpected config:" and not name the file
            raise ConfigFileError(
                f"--config {name}: holds no options (empty, or comments only); give trainer:, model:, data:, ... "
                "or leave the file out"
            )
        if not isinstance(content, dict):
            what = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true or false"}
            raise ConfigFileError(
                f"--config {name}: holds {what.get(type(content), 'a value')}, not a mapping of options "
                "(trainer:, model:, data:, ...)"
            )
