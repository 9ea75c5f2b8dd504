"""`spangate judge calibrate`: read a human labels file, and measure how well a judge's
stored verdicts agree with it (Spearman, Cohen's kappa and its Landis & Koch band, accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gateway.cli import judge_setup

if TYPE_CHECKING:
    from judge.calibrate import Agreement
    from judge.jobs import Judge, JudgeStore

# Fewer labelled rollouts than this and the reading says the numbers are still noisy.
FEW_LABELS = 30
# Landis & Koch (1977): kappa bands and what they are called.
KAPPA_BANDS = (
    (0.0, "poor"),
    (0.20, "slight"),
    (0.40, "fair"),
    (0.60, "moderate"),
    (0.80, "substantial"),
    (1.0, "almost perfect"),
)
PASS_LABELS = frozenset({"pass", "good", "true", "1", "yes"})
FAIL_LABELS = frozenset({"fail", "bad", "false", "0", "no"})


@dataclass
class Labelled:
    """One line of a labels file: a human's score (0-1) or pass/fail label for a rollout."""

    line: int
    rollout_id: str
    overall: float | str
    criteria: dict[str, float | str]


def _human_value(value: Any, what: str) -> float | str:
    """A score in [0, 1] stays a float; a label becomes "pass" or "fail"."""
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, int | float):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"{what} must be between 0 and 1, got {value}")
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in PASS_LABELS:
            return "pass"
        if text in FAIL_LABELS:
            return "fail"
    raise ValueError(
        f"{what} {value!r} is neither a score in [0, 1] nor a label (pass/fail, good/bad, "
        "true/false, 1/0)"
    )


def _label_value(value: Any, what: str) -> str:
    """A `label` field: pass/fail, also written as 1/0 or true/false."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value in (0, 1):
        return "pass" if value else "fail"
    found = _human_value(value, what)
    if not isinstance(found, str):
        raise ValueError(f"{what} {value!r} is not a label (pass/fail, good/bad, true/false)")
    return found


def parse_labels(path: str) -> list[Labelled]:
    """Every labelled line of a JSONL file; the first bad line is a ClickException naming it."""
    import orjson

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise click.ClickException(
            f"cannot read {path}: not UTF-8 (byte {exc.object[exc.start]:#x} at offset "
            f"{exc.start}); JSON lines are UTF-8"
        ) from exc
    found: list[Labelled] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from exc
            if not isinstance(item, dict):
                raise ValueError("expected a JSON object")
            rollout_id = item.get("rollout_id")
            if not isinstance(rollout_id, str) or not rollout_id:
                raise ValueError("`rollout_id` (a string) is missing")
            if item.get("score") is not None:
                if isinstance(item["score"], bool) or not isinstance(item["score"], int | float):
                    raise ValueError(f"`score` must be a number in [0, 1], got {item['score']!r}")
                overall = _human_value(item["score"], "`score`")
            elif item.get("label") is not None:
                overall = _label_value(item["label"], "`label`")
            else:
                raise ValueError("give a `score` (0-1) or a `label` (pass/fail)")
            given = item.get("criteria") or {}
            if not isinstance(given, dict):
                raise ValueError("`criteria` must be an object of name: score or label")
            criteria = {
                str(name): _human_value(value, f"criteria.{name}") for name, value in given.items()
            }
        except ValueError as exc:
            raise click.ClickException(f"{path} line {number}: {exc}") from exc
        found.append(Labelled(number, rollout_id, overall, criteria))
    if not found:
        raise click.ClickException(f"{path} has no labelled rollouts")
    return found


def kappa_band(kappa: float) -> str:
    """Landis & Koch's name for a kappa value."""
    if kappa < 0:
        return "poor"
    for upper, name in KAPPA_BANDS[1:]:
        if kappa <= upper:
            return name
    return KAPPA_BANDS[-1][1]


def _agree(name: str, pairs: list[tuple[float | str, float]], threshold: float) -> Agreement | None:
    from judge.calibrate import agreement, label_of

    if not pairs:
        return None
    humans = [h for h, _ in pairs]
    if any(isinstance(h, str) for h in humans):
        # Labels and scores mixed: compare everything as labels, scores cut at the threshold.
        humans = [
            h if isinstance(h, str) else ("pass" if label_of(h, (threshold,)) else "fail")
            for h in humans
        ]
    return agreement(name, humans, [j for _, j in pairs], thresholds=(threshold,))


def reading(overall: Agreement) -> str:
    """One line on how far to trust the judge, from its overall agreement."""
    parts = []
    if overall.kappa is not None:
        parts.append(f"kappa {overall.kappa:.2f}: {kappa_band(overall.kappa)} agreement")
    if overall.spearman is not None:
        parts.append(f"Spearman {overall.spearman:.2f}")
    line = "; ".join(parts)
    if overall.n < FEW_LABELS:
        line += f" (only {overall.n} labelled rollouts: label more before trusting it)"
    return line


def _stored_verdicts(
    db: str, judge_obj: Judge, rollout_ids: Sequence[str]
) -> tuple[set[str], dict[str, tuple[float, dict[str, float]]]]:
    """(rollouts that exist, {rollout: (score, dimensions)} of this judge version's verdicts)."""
    import orjson

    from gateway.cli.options import read_db
    from judge.verdict import reward_id
    from store.backend import dialect_of, json_table

    ids = list(dict.fromkeys(rollout_ids))
    by_reward = {reward_id(judge_obj.name, judge_obj.version, rid): rid for rid in ids}
    with read_db(db) as conn:
        listed = json_table(dialect_of(conn), "?", "listed")
        known = {
            row[0]
            for row in conn.execute(
                f"select id from rollouts where id in (select listed.value from {listed})",
                [orjson.dumps(ids).decode()],
            ).fetchall()
        }
        rows = conn.execute(
            "select id, value, dimensions from rewards "
            f"where id in (select listed.value from {listed})",
            [orjson.dumps(list(by_reward)).decode()],
        ).fetchall()
    verdicts = {}
    for reward, value, dimensions in rows:
        dims = orjson.loads(dimensions) if isinstance(dimensions, str) else dimensions or {}
        verdicts[by_reward[reward]] = (float(value), {k: float(v) for k, v in dims.items()})
    return known, verdicts


@click.command("calibrate")
@click.option(
    "--labels",
    "labels_path",
    required=True,
    type=click.Path(dir_okay=False),
    metavar="FILE.jsonl",
    help='Human labels, one JSON object a line: {"rollout_id": "r-1", "score": 0.8} or '
    '{"rollout_id": "r-1", "label": "pass"}, optionally with "criteria": {"name": 0.9}.',
)
@judge_setup.judge_option("rules")
@click.option(
    "--threshold",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Scores at or above it count as pass when comparing labels (kappa, accuracy).",
)
@click.option(
    "--run", "run_missing", is_flag=True, help="Judge the labelled rollouts it has not judged yet."
)
@judge_setup.concurrency_option("With --run: rollouts judged at once.")
@judge_setup.judge_context_options
def calibrate_command(
    labels_path: str,
    judge_name: str,
    threshold: float,
    run_missing: bool,
    concurrency: int,
    config_path: str | None,
    db: str,
    gateway_url: str | None,
    as_json: bool,
) -> None:
    """Measure how well a judge agrees with human labels, overall and per criterion.

    Reads this judge version's stored verdicts for the labelled rollouts and
    reports n, Spearman (human scores vs judge scores), Cohen's kappa and
    accuracy (pass/fail at --threshold) and the mean absolute error, with a
    reading of kappa on Landis & Koch's scale: whether to trust the judge before
    automating it. Labelled rollouts that are unknown or not judged are counted.

    Example:

    \b
        spangate judge run --judge llm --rollout r-1 --rollout r-2
        spangate judge calibrate --labels labels.jsonl --judge llm
        spangate judge calibrate --labels labels.jsonl --judge llm --run --json
    """
    from gateway.cli import render as cli_render

    labels = parse_labels(labels_path)
    model, chosen, db = judge_setup.ready_judge(judge_name, config_path, db, will_run=run_missing)
    rollout_ids = [item.rollout_id for item in labels]
    known, verdicts = _stored_verdicts(db, chosen, rollout_ids)
    if run_missing:
        todo = [rid for rid in dict.fromkeys(rollout_ids) if rid in known and rid not in verdicts]
        if todo:

            async def select(store: JudgeStore) -> list[str]:
                return todo

            judge_setup.JobRun(chosen, model, db, gateway_url, concurrency, force=False).run(select)
            known, verdicts = _stored_verdicts(db, chosen, rollout_ids)

    unknown = sorted({item.rollout_id for item in labels if item.rollout_id not in known})
    unjudged = sorted(
        {item.rollout_id for item in labels if item.rollout_id in known} - set(verdicts)
    )
    overall_pairs: list[tuple[float | str, float]] = []
    criteria_pairs: dict[str, list[tuple[float | str, float]]] = {}
    for item in labels:
        verdict = verdicts.get(item.rollout_id)
        for name in item.criteria:
            criteria_pairs.setdefault(name, [])
        if verdict is None:
            continue
        score, dimensions = verdict
        overall_pairs.append((item.overall, score))
        for name, human in item.criteria.items():
            if name in dimensions:
                criteria_pairs[name].append((human, dimensions[name]))

    overall = _agree("overall", overall_pairs, threshold)
    if overall is None:
        hint = "" if run_missing else " (pass --run to judge them)"
        raise click.ClickException(
            f"none of the {len(labels)} labelled rollouts has a verdict from judge "
            f"{chosen.name} ({chosen.version}): {len(unknown)} unknown, "
            f"{len(unjudged)} not judged{hint}"
        )
    per_criterion = {name: _agree(name, pairs, threshold) for name, pairs in criteria_pairs.items()}
    summary_line = reading(overall)
    if as_json:
        click.echo(
            cli_render.json_line(
                {
                    "judge": chosen.name,
                    "version": chosen.version,
                    "threshold": threshold,
                    "labels": len(labels),
                    "overall": overall.as_dict(),
                    "criteria": {
                        name: (found.as_dict() if found else {"name": name, "n": 0})
                        for name, found in per_criterion.items()
                    },
                    "reading": summary_line,
                    "unknown_rollouts": unknown,
                    "unjudged_rollouts": unjudged,
                }
            )
        )
        return
    rows = [["", "N", "SPEARMAN", "KAPPA", "ACCURACY", "MAE"]]
    for name, found in [("overall", overall), *per_criterion.items()]:
        if found is None:
            rows.append([name, "0", "-", "-", "-", "-"])
            continue
        rows.append(
            [
                name,
                str(found.n),
                judge_setup.score_text(found.spearman, 2),
                judge_setup.score_text(found.kappa, 2),
                judge_setup.score_text(found.accuracy, 2),
                judge_setup.score_text(found.mean_abs_error, 2),
            ]
        )
    click.echo(
        cli_render.printable(
            f"judge {chosen.name} ({chosen.version}) against {len(labels)} labels "
            f"(pass at score >= {threshold:g})"
        )
    )
    click.echo("")
    for line in judge_setup.table_lines(rows, right=frozenset({1, 2, 3, 4, 5})):
        click.echo(line)
    click.echo("")
    click.echo(summary_line)
    left_out = []
    if unknown:
        left_out.append(
            f"{len(unknown)} unknown rollout{'s' * (len(unknown) != 1)} ({', '.join(unknown[:5])}{'…' * (len(unknown) > 5)})"
        )
    if unjudged:
        left_out.append(
            f"{len(unjudged)} not judged by {chosen.name} yet"
            + ("" if run_missing else " (--run judges them)")
        )
    if left_out:
        click.echo(cli_render.printable("left out: " + "; ".join(left_out)), err=True)
