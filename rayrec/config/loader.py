"""Load a job YAML, apply dotted overrides, validate, and explain errors in one message.

Overrides are ``key=value`` strings (``train.optim.lr=3e-4``, ``train.eval.ks=[5,10]``,
``scaling.use_gpu=true``). The value is read as a YAML scalar or flow list with
``yaml.safe_load`` and then typed by the schema; nothing is ever ``eval``-ed.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rayrec.config.schema import JobConfig
from rayrec.errors import ConfigError
from rayrec.secrets import mask, shown

M = TypeVar("M", bound=BaseModel)


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read ``path``, apply ``overrides`` and return the validated job config."""
    return load_model(JobConfig, path, overrides)


def load_model(model: type[M], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> M:
    """Read a YAML file into ``model`` (any strict pydantic model) with dotted overrides."""
    path = Path(path)
    raw, lines = read_yaml(path)
    applied = apply_overrides(raw, overrides, model)
    return validate(model, raw, source=str(path), lines=lines, overridden=applied)


def read_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse a YAML mapping and remember the line of every dotted key (for messages)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such job file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
        lines = _key_lines(yaml.compose(text), source=path)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, lines


def _key_lines(node: yaml.Node | None, prefix: str = "", source: Path | None = None) -> dict[str, int]:
    """The line of every dotted key; a key given twice in one mapping is an error (YAML would keep the last
    value without a word)."""
    out: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            line = key_node.start_mark.line + 1
            if dotted in out:
                raise ConfigError(f"{source}:{line}: key {dotted} is given twice (also on line {out[dotted]}); "
                                  "keep one")
            out[dotted] = line
            out.update(_key_lines(value_node, dotted + ".", source))
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value`` and read the value as YAML (numbers, booleans, lists, null)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{shown(item)}' is not of the form key=value (e.g. train.optim.lr=3e-4)")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{_shown_override(item)}': value is not valid YAML: {e}") from None
    return key, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...], model: type[BaseModel]) -> dict[str, str]:
    """Set each override into ``raw`` in place; return ``{dotted key: override text}``.

    A segment after a list picks an item by index or, for lists of named items (phases,
    stages, strategies), by name: ``train.phases.joint.loss_weights.recon=0.5``.
    """
    applied: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        parts = key.split(".")
        node: Any = raw
        resolved: list[str] = []  # the key with list items as indices (how validation errors name it)
        for depth, part in enumerate(parts[:-1]):
            prefix = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                index = list_index(node, part, f"override '{item}': {'.'.join(parts[:depth])}")
                child = node[index]
                resolved.append(str(index))
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                resolved.append(part)
            if not isinstance(child, dict | list):
                raise ConfigError(f"override '{item}': '{prefix}' is a value, not a section")
            node = child
        if isinstance(node, list):
            index = list_index(node, parts[-1], f"override '{item}': {'.'.join(parts[:-1])}")
            node[index] = value
            resolved.append(str(index))
        else:
            node[parts[-1]] = value
            resolved.append(parts[-1])
        applied[".".join(resolved)] = item
    return applied


def list_index(items: list[Any], part: str, where: str) -> int:
    """The index of ``part`` in ``items``: a number, or the name of exactly one item."""
    if part.lstrip("-").isdigit():
        i = int(part)
        if not 0 <= i < len(items):
            raise ConfigError(f"{where} has {len(items)} items; index {i} is out of range")
        return i
    names = [it.get("name") if isinstance(it, dict) else None for it in items]
    hits = [i for i, n in enumerate(names) if n == part]
    if len(hits) != 1:
        shown = ", ".join(f"{i}:{n}" for i, n in enumerate(names))
        why = "no item" if not hits else "several items"
        raise ConfigError(f"{where} has {why} named '{part}' (items: {shown}); select one by name or index")
    return hits[0]


def validate(
    model: type[M],
    raw: dict[str, Any],
    *,
    source: str,
    lines: dict[str, int] | None = None,
    overridden: dict[str, str] | None = None,
) -> M:
    """Validate ``raw`` against ``model``; turn pydantic's errors into one clear message."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, model, source, lines or {}, overridden or {})) from None


def explain(
    err: ValidationError,
    model: type[BaseModel],
    source: str,
    lines: dict[str, int],
    overridden: dict[str, str],
) -> str:
    """One message, a line per error: where (file:line or the override), the dotted key, given vs. allowed.

    The one explainer of every strict schema (job files here, sweep files in ``rayrec.tune.space``):
    what it echoes of the input (override values, given values) is masked (``rayrec.secrets``).
    """
    out = []
    for e in err.errors():
        loc, parent, at = _resolve(e["loc"], model)
        dotted = ".".join(loc)
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            out.append(f"{where(dotted, source, lines, overridden)}: unknown key '{dotted}'"
                       f"{_suggest(loc, model, parent)}")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # a variant's tag (name, dist) is off
            ctx, models = e.get("ctx", {}), _models(at)
            key = next(iter(_tag_keys(models)), str(ctx.get("discriminator", "")).strip("'"))
            allowed = ", ".join(_variant_tags(models)) or str(ctx.get("expected_tags", "")).replace("'", "")
            echo = f"(given: {_shown_at(key, ctx['tag'])!r})" if "tag" in ctx else "(missing)"
            out.append(f"{where(f'{dotted}.{key}', source, lines, overridden)}: {dotted or '(top level)'}: "
                       f"`{key}` must be one of {allowed} {echo}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            echo = "" if isinstance(given, dict | list) else f" (given: {_shown_at(dotted, given)!r})"  # not a section
            out.append(f"{where(dotted, source, lines, overridden)}: {dotted or '(top level)'}: {msg}{echo}")
    return "\n".join(out)


def where(dotted: str, source: str, lines: dict[str, int], overridden: dict[str, str]) -> str:
    """Where the value at ``dotted`` (or the nearest section above it) was set: ``source: override 'k=v'``
    (the value masked), ``source:LINE`` (``lines``: line of each dotted key of the file), else ``source``."""
    for key in _prefixes(dotted):
        if key in overridden:
            return f"{source}: override '{_shown_override(overridden[key])}'"
        if key in lines:
            return f"{source}:{lines[key]}"
    return source


def _shown_override(item: str) -> str:
    """``key=value`` as echoed in an error: a key-like, credential-bearing or secret-named value masked."""
    key, sep, value = item.partition("=")
    return f"{key}{sep}{_shown_at(key.strip(), value)}" if sep else item


def _shown_at(dotted: str, value: Any) -> Any:
    """``value`` of the key ``dotted`` as echoed in an error: ``shown``, and masked where the key's name says
    it holds a secret (``password``, ``*_api_key``; as ``rayrec.secrets.mask`` does in stored configs)."""
    leaf = dotted.rsplit(".", 1)[-1]
    return mask({leaf: shown(value)})[leaf]


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _resolve(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[list[str], list[Any], list[Any]]:
    """An error location as the file spells it, and the types found on the way.

    Drops the tags pydantic inserts after a tagged-union value (``model.sasrec.hidden`` -> ``model.hidden``,
    a sweep's ``params.lr.loguniform.low`` -> ``params.lr.low``) but keeps real keys that equal a tag (the
    ur4rec variant's ``model.sasrec.hidden``) and mapping keys (``params.<path>``). Returns the path, the
    types of the value its last key is in, and the types of the value it names ([] when not known).
    Unknown paths fall back to dropping every tag of the schema.
    """
    out: list[str] = []
    parent: list[Any] = []
    types_: list[Any] | None = [model]
    for part in loc:
        if types_ is None:
            if not (isinstance(part, str) and part in _schema_tags(model)):
                out.append(str(part))
            continue
        tagged = _variant_tags(_models(types_))
        if isinstance(part, str) and part in tagged:
            types_ = [tagged[part]]
            continue
        out.append(str(part))
        parent, types_ = types_, [c for t in types_ for c in _children(t, part)] or None
    return out, parent, types_ or []


def _children(annotation: Any, part: Any) -> list[Any]:
    """Types of the value at key or index ``part`` of a value of type ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _children(args[0], part)
    if origin in (typing.Union, types.UnionType):
        return [c for a in args for c in _children(a, part)]
    if origin in (list, tuple, set, frozenset):
        return list(args[:1]) if isinstance(part, int) else []
    if origin is dict:
        return list(args[1:])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and part in annotation.model_fields:
        return [annotation.model_fields[part].annotation]
    return []


def _models(annotations: list[Any]) -> list[type[BaseModel]]:
    return list(dict.fromkeys(m for a in annotations for m in _models_in(a)))


def _tag_keys(models: list[type[BaseModel]]) -> list[str]:
    """The tag field of a union of models (``name``, a sweep param's ``dist``): a Literal field they all have."""
    if len(models) < 2:
        return []
    literal = [[k for k, f in m.model_fields.items() if typing.get_origin(f.annotation) is typing.Literal]
               for m in models]
    return [k for k in literal[0] if all(k in other for other in literal[1:])]


def _variant_tags(models: list[type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """``{tag: model}`` of a tagged union of models ({} for one model)."""
    return {t: m for k in _tag_keys(models) for m in models for t in typing.get_args(m.model_fields[k].annotation)}


def _schema_tags(model: type[BaseModel]) -> set[str]:
    """Every tag of every tagged union in ``model``'s schema (also in lists and mappings)."""
    tags: set[str] = set()
    seen = [model]
    for m in seen:
        for field in m.model_fields.values():
            nested = _nested_models(field.annotation)
            tags.update(_variant_tags(nested))
            seen.extend(n for n in nested if n not in seen)
    return tags


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Models in ``annotation`` at any depth (unions, Annotated, lists, mappings)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return list(dict.fromkeys(m for a in typing.get_args(annotation) for m in _nested_models(a)))


def _suggest(loc: list[str], model: type[BaseModel], parent: list[Any]) -> str:
    """'; did you mean a.b?' and the valid keys next to the unknown key ``loc``."""
    paths = config_paths(model)
    dotted = ".".join(p for p in loc if not p.isdigit())  # list items: model.stages.0.x -> model.stages.x
    leaf = dotted.rsplit(".", 1)[-1]
    parent_path = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    if parent_path and not any(p.startswith(parent_path + ".") for p in paths):  # in a mapping (a sweep's params)
        keys = list(dict.fromkeys(k for m in _models(parent) for k in m.model_fields))
        if not keys:
            return ""
        near = difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6)
        inside = ".".join(loc[:-1])
        hint = f"; did you mean {' or '.join(f'{inside}.{k}' for k in near)}?" if near else ""
        return f"{hint} (valid keys in {inside}: {', '.join(keys)})"
    same_leaf = sorted((p for p in paths if p.rsplit(".", 1)[-1] == leaf),
                       key=lambda p: -difflib.SequenceMatcher(None, dotted, p).ratio())
    near = difflib.get_close_matches(dotted, paths, n=6, cutoff=0.75)
    close = (same_leaf + [p for p in near if p not in same_leaf and not dotted.startswith(p + ".")])[:3]
    siblings = sorted({p[len(parent_path) + 1 :].split(".")[0] for p in paths
                       if parent_path and p.startswith(parent_path + ".")})
    if not parent_path:
        siblings = sorted({p.split(".")[0] for p in paths})
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{hint} (valid keys{' in ' + parent_path if parent_path else ''}: {', '.join(siblings)})"


def config_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted path of ``model`` (leaves and sections), union over tagged variants."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        out.append(dotted)
        for sub in _models_in(field.annotation) or _list_item_models(field.annotation):
            out.extend(p for p in config_paths(sub, dotted + ".") if p not in out)
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def _list_item_models(annotation: Any) -> list[type[BaseModel]]:
    """Models of a list field's items (``stages: list[StageConfig]``), listed without an index."""
    if typing.get_origin(annotation) is list:
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return []


def dump_job(cfg: BaseModel) -> str:
    """The resolved config as YAML (paths as strings), for MLflow and checkpoints; credentials in URIs
    and values of secret-named keys are masked (``rayrec.secrets.mask``)."""
    return yaml.safe_dump(mask(cfg.model_dump(mode="json")), sort_keys=False)


def flatten(cfg: BaseModel) -> dict[str, Any]:
    """``{"train.optim.lr": 0.001, ...}``: the resolved config as flat params."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(mask(cfg.model_dump(mode="json")), "")
    return out
