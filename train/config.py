"""Training configuration: YAML -> typed, validated schema, with dotted command-line overrides.

pydantic v2 models with ``extra="forbid"`` give type coercion and unknown-key detection;
this module only turns their errors into one line per problem that names the key, the
file, and the fix (closest valid key suggested), and collects *all* problems at once
(litgpt's ``validate_args`` style) before any weights are loaded.
"""

from __future__ import annotations

import difflib
import os
import reprlib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from loracraft.infer.errors import ConfigError

# The section models live in config_schema; re-exported so `from loracraft.train.config import Config` works.
from loracraft.train.config_schema import (  # noqa: F401
    ATTN_TARGETS,
    GENERATION_SEED_LIMIT,
    MAX_RANK,
    MAX_RESOLUTION,
    NON_TRAINING_SECTIONS,
    TEXT_ENCODER_TARGETS,
    TRAIN_SEED_LIMIT,
    TRANSFORMER_TARGETS,
    CheckpointCfg,
    ClassGenerationCfg,
    Config,
    DataCfg,
    DreamBoothCfg,
    LoraCfg,
    MixedPrecision,
    ModelCfg,
    OutputCfg,
    PreserveCfg,
    SamplePromptCfg,
    TextEncoderLoraCfg,
    TrainCfg,
    ValidationCfg,
)

#: YAML anchors/aliases may expand a document to at most this many nodes (an "alias bomb" of
#: nested aliases otherwise expands to billions while it is validated or printed).
MAX_YAML_NODES = 100_000
#: Values quoted in error messages are cut to this many characters.
MAX_QUOTED = 200


def normalize_training(old: dict) -> dict:
    """Re-validate a saved ``config_training`` with today's schema so keys added since then
    (at their defaults) do not count as changes; unparseable old configs compare raw."""
    try:
        return Config.model_validate(old).training_relevant()
    except ValidationError:
        return old


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable ``key: old -> new`` lines between two nested config dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


# ----------------------------------------------------------------------------- key lookup
def _section_fields(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def _all_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """Every settable key; an optional section (``dreambooth``, ``lora.text_encoder``) is listed
    itself (it can be set whole, or to null) and with its sub-keys."""
    keys = []
    for name, field in model.model_fields.items():
        ann = _unwrap_model(field.annotation)
        optional = _optional_model(field.annotation)
        if ann is not None:
            keys += _all_keys(ann, f"{prefix}{name}.")
        elif optional is not None:
            keys.append(f"{prefix}{name}")
            keys += _all_keys(optional, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unwrap_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _optional_model(annotation: Any) -> type[BaseModel] | None:
    """``Section | None`` -> Section (a section that is off unless given)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(args) == 1:
        return _unwrap_model(args[0])
    return None


def _field_for(dotted: str) -> Any | None:
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return None
        sub = _unwrap_model(field.annotation)
        if i == len(parts) - 1:
            return field if sub is None else None
        sub = sub or _optional_model(field.annotation)
        if sub is None:
            return None
        model = sub
    return None


def suggest_key(dotted: str) -> str:
    """' (did you mean X?)' for the closest valid key, or '' when nothing is close."""
    if "." not in dotted:
        leaf_hits = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == dotted]
        if leaf_hits:
            return f" (did you mean '{leaf_hits[0]}'?)"
        match = difflib.get_close_matches(dotted, list(Config.model_fields), n=1, cutoff=0.5)
        return f" (did you mean '{match[0]}'?)" if match else ""
    keys = _all_keys()
    match = difflib.get_close_matches(dotted, keys, n=1, cutoff=0.6)
    if not match:
        leaf = dotted.rsplit(".", 1)[-1]
        match = [k for k in keys if k.rsplit(".", 1)[-1] == leaf] or difflib.get_close_matches(
            leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.75
        )
        if match and "." not in match[0]:
            match = [k for k in keys if k.endswith("." + match[0])]
    return f" (did you mean '{match[0]}'?)" if match else ""


# ----------------------------------------------------------------------------- overrides
def _accepts_str(annotation: Any) -> bool:
    if annotation is str:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(annotation))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts_str(a) for a in typing.get_args(annotation))
    return False


def _accepts_none(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def parse_override(item: str) -> tuple[str, Any]:
    """``key.path=value`` -> (key, value converted for that key's declared type).

    Plain YAML parsing gets `train.lr=1e-4` (a string in YAML 1.1) and
    `train.mixed_precision=no` (False) wrong, so scalars stay strings for pydantic's
    type-aware coercion; only lists/maps and null are parsed as YAML.
    """
    if "=" not in item:
        raise ConfigError(
            f"override '{item}' has no '=', command line, write it as key.path=value (e.g. train.max_steps=20)"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    field = _field_for(key)
    if field is None:
        raise ConfigError(f"unknown config key '{key}', command-line override{suggest_key(key)}")
    raw = raw.strip()
    if raw[:1] in ("[", "{"):
        try:
            return key, yaml.load(raw, Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value of '{key}' ({quote(raw)}), command line, use YAML list syntax like [a, b]") from e
    if raw in ("null", "~", "None") and _accepts_none(field.annotation):
        return key, None
    if not _accepts_str(field.annotation) and typing.get_origin(field.annotation) is list:
        return key, [raw]
    return key, raw


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key`` ``a.b.c``, making (or replacing non-dict) parents."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


# ----------------------------------------------------------------------------- loading
def quote(value: Any, limit: int = MAX_QUOTED) -> str:
    """``repr(value)`` cut to ``limit`` characters: a pasted blob must not flood the terminal
    (reprlib stops walking a huge nested value early, so building the text is cheap too)."""
    r = reprlib.Repr()  # (keyword arguments only from Python 3.12)
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 3, 8, 8, limit, limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _source_of(loc: str, source: str, overrides: dict[str, str]) -> str:
    """Where a bad value came from: the override that set it (or a parent of it), else the file."""
    for key, item in overrides.items():
        if loc == key or loc.startswith(key + "."):
            return f"command line: {item if len(item) <= MAX_QUOTED else item[: MAX_QUOTED - 3] + '...'}"
    return source


def _item_loc(loc: tuple) -> str | None:
    """``data.concepts[1].path`` for a key inside a list item (``data.concepts``), else None; a
    trailing index (one value of a list of strings) is left out, as for every other key."""
    parts = [f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc]
    while parts and parts[-1].startswith("["):
        parts.pop()
    shown = "".join(parts).lstrip(".")
    return shown if "[" in shown else None


def _item_suggestion(loc: tuple) -> str:
    """' (did you mean X?)' among the keys of the list item an unknown key was found in."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        ann = field.annotation if field is not None else None
        model = _unwrap_model(ann) or _optional_model(ann) or next(
            (m for a in typing.get_args(ann) if (m := _unwrap_model(a))), None
        )
    names = list(model.model_fields) if model is not None else []
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _format_errors(err: ValidationError, source: str, overrides: dict[str, str] | None = None) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        where = _source_of(loc, source, overrides or {})
        item = _item_loc(e["loc"])
        if item is not None:  # inside a list item (data.concepts): no dotted override reaches it
            if e["type"] == "missing":
                problems.append(f"required config key '{item}' is not set, {where}, give it in the YAML")
            elif e["type"] == "extra_forbidden":
                problems.append(f"unknown config key '{item}', {where}, remove it{_item_suggestion(e['loc'])}")
            else:
                got = e.get("input")
                got_s = "" if isinstance(got, dict) else f" (got {quote(got)})"
                problems.append(f"bad value for '{item}'{got_s}, {where}: {e['msg'].lower()}")
            continue
        required = _field_for(loc) is not None and _field_for(loc).is_required()
        if e["type"] == "missing" or (required and e.get("input") is None):
            problems.append(
                f"required config key '{loc}' is not set, {where}, set it in the YAML ({loc}: ...) or on the "
                f"command line ({loc}=...)"
            )
            continue
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown config key '{loc}', {where}, remove it{suggest_key(loc)}")
        elif not loc:
            problems.append(f"{e['msg'].removeprefix('Value error, ')}, {where}")
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict) else f" (got {quote(got)})"
            problems.append(f"bad value for '{loc}'{got_s}, {where}: {e['msg'].lower()}")
    return problems


class _TooManyNodes(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents whose aliases expand past MAX_YAML_NODES nodes.

    PyYAML shares an aliased node instead of copying it, so loading stays cheap; the blow-up
    comes later, when pydantic walks the value or an error message prints it. The expanded
    size is counted on the composed node graph (memoised per node), before anything is built.
    """

    def construct_document(self, node):
        sizes: dict[int, int] = {}

        def size(n) -> int:
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a recursive alias counts once instead of looping
            total = 1
            if isinstance(n, yaml.SequenceNode):
                total += sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total += sum(size(k) + size(v) for k, v in n.value)
            sizes[id(n)] = total
            if total > MAX_YAML_NODES:
                raise _TooManyNodes()
            return total

        size(node)
        return super().construct_document(node)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found, {p}, check the path (recipes ship in configs/)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_BoundedLoader)  # noqa: S506 (a SafeLoader)
    except RecursionError as e:
        raise ConfigError(f"config nests too deeply, {p}, flatten it (no recursive anchors/aliases)") from e
    except _TooManyNodes as e:
        raise ConfigError(
            f"config's anchors/aliases expand to more than {MAX_YAML_NODES} values, {p}, write the values out "
            "or use fewer aliases"
        ) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"config is not valid YAML, {where}, fix the syntax ({getattr(e, 'problem', e)})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config is not UTF-8 text, {p}, save it as UTF-8") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping of sections, {p}, start with e.g. 'model:'")
    return data


def build_config(data: dict, overrides: list[str] | None = None, source: str = "config") -> Config:
    """Validate a config mapping plus overrides, raising one ConfigError listing every problem."""
    problems: list[str] = []
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    given: dict[str, str] = {}  # key -> the override that set it, for error messages
    for item in overrides or []:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            problems += e.problems
            continue
        set_dotted(tree, key, value)
        given[key] = item
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as e:
        problems += _format_errors(e, source, given)
        cfg = None
    if cfg is not None:
        problems += [f"{what}, {source}, {fix}" for what, fix in cfg.contradictions()]
    if problems:
        raise ConfigError(problems[0], problems)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe, apply dotted overrides, fill `output.dir` from the file stem, and make
    local paths absolute (so run.json, and `loracraft reproduce`, work from any folder)."""
    cfg = build_config(read_yaml(path), overrides, source=str(path))
    if cfg.output.dir is None:
        cfg.output.dir = str(Path("runs") / Path(path).stem)
    return absolute_paths(cfg)


def _absolute(value: str) -> str:
    return os.path.abspath(os.path.expanduser(value))


def absolute_paths(cfg: Config) -> Config:
    """Local paths -> absolute, as the user meant them from the current folder. ``model.base`` and
    ``data.path`` stay as given when no such local path exists (hub ids, or an error later)."""
    for section, key, only_if_exists in LOCAL_PATH_KEYS:
        owner = getattr(cfg, section) if section != "dreambooth" else cfg.dreambooth
        value = getattr(owner, key, None) if owner is not None else None
        if not isinstance(value, str) or (only_if_exists and not Path(value).expanduser().exists()):
            continue
        if section == "checkpoint" and value in ("auto", "latest", "false", "true"):
            continue
        if section == "data" and key == "masks" and value == "alpha":  # the images' alpha, not a folder
            continue
        setattr(owner, key, _absolute(value))
    for concept in cfg.data.concepts:  # like data.path: local folders only, hub ids stay
        if Path(concept.path).expanduser().exists():
            concept.path = _absolute(concept.path)
    return cfg


#: (section, key, only when it exists locally): the config values that name local files or folders.
LOCAL_PATH_KEYS = (
    ("model", "base", True),
    ("model", "config", False),
    ("data", "path", True),
    ("data", "masks", False),
    ("dreambooth", "class_data", False),
    ("train", "cache_dir", False),
    ("output", "dir", False),
    ("checkpoint", "resume", False),
)


def config_help() -> str:
    """Every key with its type and default: the text of `loracraft train --help-config`."""
    lines = []
    for key in _all_keys():
        field = _field_for(key)
        default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
        desc = f"  # {field.description}" if field.description else ""
        lines.append(f"{key} = {default}{desc}")
    return "\n".join(lines)
