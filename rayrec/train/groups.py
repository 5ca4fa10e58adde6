"""Optimizer parameter groups from name patterns: per-module LR and weight-decay multipliers.

Each trainable parameter lands in the group of the first rule whose pattern matches its
name (phase rules before ``train.optim.groups``), split by whether it decays: biases,
norm weights and embeddings get no weight decay unless ``optim.decay_all`` or the rule's
``decay`` says so. ``group_table`` is what ``rayrec train JOB --print-groups`` prints.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from rayrec.config.progressive import GroupRule
from rayrec.config.schema import OptimConfig
from rayrec.errors import ConfigError

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
DEFAULT = "default"


def matches(name: str, pattern: str) -> bool:
    """``pattern`` matches the parameter ``name`` itself or a module it lives under."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that by default get no weight decay: biases (any 1-d tensor), norms, embeddings."""
    out = set()
    for mname, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, *NORMS)):
            out.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    out.update(n for n, p in model.named_parameters() if p.ndim < 2)
    return out


@dataclass
class Group:
    """One optimizer param group: its label, multipliers, effective values and members."""

    label: str
    lr: float
    weight_decay: float
    lr_mult: float
    wd_mult: float
    decay: bool
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def as_param_group(self) -> dict:
        return {"params": self.params, "lr": self.lr, "weight_decay": self.weight_decay, "name": self.label}


def build_groups(named: Iterable[tuple[str, nn.Parameter]], optim: OptimConfig, *, rules: list[GroupRule] = (),
                 lr_mult: float = 1.0, no_decay: set[str] = frozenset(), base_lr: float | None = None,
                 where: str = "train.optim.groups", required: int | None = None) -> list[Group]:
    """The param groups of the trainable parameters in ``named`` (order: rules, then the default).

    ``base_lr`` replaces ``optim.lr`` (a ur4rec stage's module learning rate). Each of the first
    ``required`` rules (default: all) must match a trainable parameter, else an error names it
    (a typo would silently train at 1x); the others may match only frozen ones.
    """
    rules, named = list(rules), list(named)
    lr0 = optim.lr if base_lr is None else base_lr
    groups: dict[tuple[int, bool], Group] = {}
    used = [False] * len(rules)
    for name, p in named:
        if not p.requires_grad:
            continue
        idx = next((i for i, r in enumerate(rules) if matches(name, r.pattern)), -1)
        rule = rules[idx] if idx >= 0 else GroupRule(pattern=DEFAULT)
        if idx >= 0:
            used[idx] = True
        decay = optim.decay_all or name not in no_decay
        if rule.decay is not None:
            decay = rule.decay
        key = (idx if idx >= 0 else len(rules), decay)
        if key not in groups:
            label = rule.pattern + ("" if decay else " (no decay)")
            wd = optim.weight_decay * rule.wd_mult if decay else 0.0
            groups[key] = Group(label, lr0 * lr_mult * rule.lr_mult, wd, rule.lr_mult, rule.wd_mult, decay)
        groups[key].names.append(name)
        groups[key].params.append(p)
    unused = [r.pattern for r, u in list(zip(rules, used, strict=True))[: len(rules) if required is None else required]
              if not u]
    if unused:
        raise ConfigError(f"{where}: pattern(s) {unused} match no trainable parameter; parameter names look like "
                          f"{_examples(named)}")
    return [groups[k] for k in sorted(groups)]


def check_rules(rules: list[GroupRule], model: nn.Module, *, skip=lambda pattern: False, hint: str = "") -> None:
    """Every ``train.optim.groups`` pattern names some parameter of ``model`` (unless ``skip(pattern)``)."""
    names = [n for n, _ in model.named_parameters()]
    for r in rules:
        if not any(matches(n, r.pattern) for n in names) and not skip(r.pattern):
            raise ConfigError(f"train.optim.groups: pattern '{r.pattern}' matches no parameter{hint}; names look like "
                              f"{names[:4]}")


def _examples(named) -> list[str]:
    names = [n for n, _ in named]
    return names[:4] + (["..."] if len(names) > 4 else [])


def make_grouped_optimizer(groups: list[Group], optim: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW([g.as_param_group() for g in groups], lr=optim.lr, betas=optim.betas,
                             weight_decay=optim.weight_decay)


def carry_state(old: torch.optim.Optimizer | None, new: torch.optim.Optimizer) -> int:
    """Move Adam's moments of the parameters still optimised from ``old`` to ``new``; returns how many."""
    if old is None:
        return 0
    kept = 0
    for group in new.param_groups:
        for p in group["params"]:
            if p in old.state:
                new.state[p] = old.state[p]
                kept += 1
    return kept


def group_table(groups: list[Group]) -> list[tuple[str, str, str, str, str]]:
    """Rows (group, tensors, parameters, lr, weight decay) for printing."""
    rows = [(g.label, str(len(g.params)), f"{g.numel:,}", f"{g.lr:.3g}", f"{g.weight_decay:.3g}") for g in groups]
    total = sum(g.numel for g in groups)
    rows.append(("trainable total", str(sum(len(g.params) for g in groups)), f"{total:,}", "", ""))
    return rows
