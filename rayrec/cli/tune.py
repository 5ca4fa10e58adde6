"""`rayrec tune`, `rayrec compare` and `rayrec diagnose`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tune", help="run a tuning sweep from a search-space file (Ray Tune + Optuna + ASHA)")
    t.add_argument("space", type=Path, help="search-space YAML, e.g. search_spaces/sasrec_quick.yaml")
    t.add_argument("overrides", nargs="*",
                   help="dotted overrides of the space (num_samples=4) or of the base job (train.optim.warmup_steps=0)")
    t.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this space")
    t.add_argument("--dry-run", action="store_true", help="validate, print the plan and sample configs; start nothing")
    t.add_argument("--export", type=Path, help="also write the best config (a job YAML) here")
    t.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show Ray's and the workers' own output here too (else: rayrec.log in the run folder)")
    t.set_defaults(func=cmd_tune)

    c = sub.add_parser("compare", help="compare the runs of an MLflow experiment (table, plots, CSV, Markdown)")
    c.add_argument("experiment", help="MLflow experiment name")
    c.add_argument("--metric", default="val/ndcg@10", help="validation metric to sort by (default val/ndcg@10)")
    c.add_argument("--runs", nargs="+", help="only these runs (ids, id prefixes or run names)")
    c.add_argument("--sweep", help="only the trials of this sweep (its name or parent run id)")
    c.add_argument("--top", type=int, default=5, help="runs drawn in the learning-curve plot")
    c.add_argument("--out", type=Path, help="output folder (default: compare/<experiment>)")
    c.add_argument("--tracking-uri", default=None, help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser("diagnose", help="explain one run's training history (overfitting, dead losses, NaNs, ...)")
    d.add_argument("run_id", help="MLflow run id (or a unique prefix)")
    d.add_argument("--metric", default=None, help="validation metric to judge by (default: the run's early-stopping metric)")
    d.add_argument("--out", type=Path, help="folder for the figure (default: diagnose/<run id>)")
    d.add_argument("--tracking-uri", default=None, help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_URI})")
    d.set_defaults(func=cmd_diagnose)


def _uri(arg: str | None) -> str:
    from rayrec.tracking.mlflow_tracking import resolve_uri

    return resolve_uri(arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI)


def cmd_tune(args: argparse.Namespace) -> int:
    from rayrec.tune.space import load_space

    sweep = load_space(args.space, args.overrides)
    print_plan(sweep)
    if args.dry_run:
        return 2 if print_samples(sweep) else 0
    from rayrec.tune.runner import run_sweep

    out = run_sweep(sweep, resume=args.resume, export=args.export, verbose=args.verbose)
    print_outcome(sweep, out)
    if sweep.job.export.name and out.best is not None and not out.interrupted:
        from rayrec.cli.recs import export_at_end

        export_at_end(out.best.checkpoint, sweep.job)  # the best trial's model
    return 130 if out.interrupted else 0


def print_plan(sweep) -> None:
    from rayrec.tune.runner import asha_rungs
    from rayrec.tune.space import reports_clock

    s = sweep.space
    print(f"sweep {sweep.name}: {s.num_samples} trials of {sweep.job_source} ({sweep.kind.name} job), "
          f"{s.max_concurrent_trials} at a time, "
          f"{s.searcher.name} search (seed {s.searcher.seed}), {s.resolved_mode} {s.metric}")
    if s.epoch_budget:
        print(f"  budget: {s.epoch_budget} trial-epochs in all (the sweep stops when its trials have trained that many)")
    if s.scheduler.name == "asha":
        rungs = ", ".join(f"{r:g}" for r in asha_rungs(s.scheduler.grace_period, s.scheduler.reduction_factor,
                                                       sweep.max_epochs))
        unit = "reports (one per train.save_steps)" if reports_clock(sweep.job) else "epochs"
        print(f"  ASHA: {sweep.max_epochs} {unit} per full trial, compared at {unit.split()[0]} {rungs} "
              f"(keep the best 1/{s.scheduler.reduction_factor:g})")
    for path in sweep.order:
        p = s.params[path]
        spec = p.model_dump(exclude={"dist", "when"}, exclude_none=True)
        cond = f"  when {p.when}" if p.when else ""
        print(f"  {path:<40} {p.dist:<12} {spec}{cond}")


def print_samples(sweep, n: int = 5, checked: int = 50) -> int:
    """Configs the searcher's sampler would propose first (Optuna alone, no Ray), and ``checked`` draws
    validated as whole trial jobs, so a constraint across fields (hidden divisible by num_heads) that
    sampled values break shows here, not at trial start. Returns the number of invalid draws."""
    import optuna

    from rayrec.config.kinds import kind_of
    from rayrec.config.loader import validate
    from rayrec.errors import ConfigError
    from rayrec.tune.paths import set_paths
    from rayrec.tune.space import OptunaSpace, trial_base

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=sweep.space.searcher.seed))
    space = OptunaSpace(sweep.space.params, sweep.order)
    base, schema = trial_base(sweep.job), kind_of(sweep.job).schema
    print(f"\nfirst {n} random draws:")
    bad: list[tuple[dict, str]] = []
    for i in range(max(n, checked)):
        params = space(study.ask())
        try:
            validate(schema, set_paths(base, params), source="sampled config")
            verdict = ""
        except ConfigError as e:
            verdict = str(e).partition(": ")[2] or str(e)
            bad.append((params, verdict))
        if i < n:
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
            print(f"  {shown}" + (f"   INVALID: {verdict}" if verdict else ""))
    if bad:
        params, verdict = bad[0]
        print(f"\n{len(bad)} of {max(n, checked)} sampled configs are invalid jobs (each such trial fails at its "
              f"start), e.g. {params}: {verdict}")
    else:
        print(f"  ({max(n, checked)} draws checked against the job schema: all valid)")
    return len(bad)


def print_outcome(sweep, out) -> None:
    import pandas as pd

    from rayrec.tune.runner import summary_frame

    frame = summary_frame(out.rows, sweep)
    print(f"\nsweep {sweep.name}: {len(out.rows)} trials " + ", ".join(
        f"{(frame['status'] == s).sum()} {s.replace('_', ' ')}" for s in sorted(set(frame.get('status', [])))))
    budget = sweep.space.epoch_budget
    from rayrec.tune.budget import recorded_spent

    trained, counted = sum(r.trained for r in out.rows), recorded_spent(out.sweep_dir)
    print(f"trial-epochs trained: {trained}" + (f" of a budget of {budget}" if budget else "")
          + (f" (the budget counted {counted}: epochs trained again after a resume, or of results lost)"
             if counted is not None and counted != trained else ""))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False) if not frame.empty else "(no trial reported)")
    if out.best is not None:
        print(f"\nbest trial {out.best.trial_id}: best {sweep.space.metric} = {out.best.value:.4f}")
        if out.best_test:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(out.best_test.items()))
            print(f"  its test metrics (reported once, not used for selection): {shown}")
        print(f"  best config: {out.best_job}   ({sweep.kind.command} {out.best_job})")
    print(f"sweep folder: {out.sweep_dir}\nresults:      {out.sweep_dir / 'results.csv'}")
    if out.store:
        print(f"sweep store:  {out.store} (Tune's state and the trials' checkpoints)")
    if out.parent_run_id:
        print(f"mlflow run:   {out.parent_run_id} (parent; trials are its children)")
    if out.interrupted:
        print(f"\ninterrupted: continue with  rayrec tune {sweep.source} --resume")
    if out.log_path is not None:
        print(f"log:          {out.log_path} (Ray and trial output; -v shows it here)")


def cmd_compare(args: argparse.Namespace) -> int:
    from rayrec.tracking.compare import compare, print_comparison

    out = args.out or Path("compare") / args.experiment
    result = compare(_uri(args.tracking_uri), args.experiment, metric=args.metric, runs=args.runs,
                     sweep=args.sweep, top=args.top, out=out)
    print_comparison(result)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from rayrec.tracking.diagnose import diagnose, print_diagnosis

    report = diagnose(_uri(args.tracking_uri), args.run_id, metric=args.metric,
                      out=args.out or Path("diagnose") / args.run_id)
    print_diagnosis(report)
    return 0
