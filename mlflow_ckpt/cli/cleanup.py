"""Cleaning up and protecting: ``gc``, ``pin``, ``unpin``."""

from __future__ import annotations

import click
from mlflow import MlflowClient
from mlflow.entities import Run

from mlflow_ckpt.catalog import describe, models, resolve, tags
from mlflow_ckpt.catalog.lineage import delete_abandoned
from mlflow_ckpt.catalog.runs import get_run
from mlflow_ckpt.catalog.shared import shared_area_uri, sweep_shared
from mlflow_ckpt.cli.group import main
from mlflow_ckpt.cli.output import errors
from mlflow_ckpt.errors import WriterConflictError
from mlflow_ckpt.manager.lease import RunClaim, take_run
from mlflow_ckpt.manager.retention import ArchiveAfterN, apply_retention, build_policy


@main.command()
@click.argument("run_id")
@click.option("--keep-last", type=click.IntRange(min=1), help="Keep the N newest.")
@click.option("--keep-best", type=click.IntRange(min=1), help="Keep the N best by --metric.")
@click.option("--keep-every", type=click.IntRange(min=1), help="Keep steps N-1, 2N-1, ...")
@click.option(
    "--archive-after",
    type=click.IntRange(min=1),
    help="Archive milestones (--keep-every) older than the N newest checkpoints, in place.",
)
@click.option("--metric", help="Metric for --keep-best (value at each checkpoint's step).")
@click.option("--mode", type=click.Choice(["min", "max"]), default="min", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option(
    "--force",
    is_flag=True,
    help="Take the run's writer lease from a live process to clean up (that writer stops).",
)
def gc(
    run_id: str,
    keep_last: int | None,
    keep_best: int | None,
    keep_every: int | None,
    archive_after: int | None,
    metric: str | None,
    mode: str,
    dry_run: bool,
    force: bool,
) -> None:
    """Clean up RUN_ID: interrupted saves, then checkpoints no --keep-* rule keeps.

    Saves cut short by a crash are adopted when complete; failed and incomplete ones are
    removed (leftover files, then their LoggedModel), as the run's writer (a live one is left
    alone unless --force takes the run over), and so are checkpoints that failed verification,
    and the local scratch folders of killed processes (those no live process holds a lock
    on), and forks of the run's checkpoints whose copy a killed process left half-done. The
    newest checkpoint, pinned ones and those registered model versions use are always kept.
    """
    try:
        policy = build_policy(
            keep_last_n=keep_last,
            keep_best_n=keep_best,
            keep_every_n_steps=keep_every,
            metric=metric,
            mode=mode,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc).replace("monitor=", "--metric")) from exc
    if archive_after is not None and keep_every is None:
        raise click.UsageError("--archive-after archives the milestones --keep-every keeps")
    archive = ArchiveAfterN(archive_after) if archive_after is not None else None
    client = MlflowClient()
    with errors():
        run = get_run(client, run_id)
        claim = _clean_interrupted(client, run, force=force, dry_run=dry_run)
        try:
            result = (
                apply_retention(client, run_id, policy, dry_run=dry_run, archive=archive)
                if policy
                else None
            )
            # The run's shared area: only as its writer (or to show what would go).
            swept = (
                sweep_shared(
                    client,
                    run_id,
                    run.info.experiment_id,
                    shared_area_uri(run.info.artifact_uri),
                    dry_run=dry_run,
                )
                if claim is not None or dry_run
                else None
            )
        finally:
            if claim is not None:
                claim.release()
    verb = "would delete" if dry_run else "deleted"
    if result is not None:
        for ckpt in result.deleted:
            click.echo(f"{verb:>12} step {ckpt.step:<8} {ckpt.uri}")
        for ckpt in result.protected:
            why = f"pinned: {ckpt.pinned}" if ckpt.pinned else "registered"
            click.echo(f"{'protected':>12} step {ckpt.step:<8} {ckpt.uri} (kept, {why})")
        for ckpt in result.archived:
            verb_a = "would archive" if dry_run else "archived"
            click.echo(f"{verb_a:>12} step {ckpt.step:<8} {ckpt.uri}")
        click.echo(f"kept {len(result.kept) + len(result.protected)}, {verb} {len(result.deleted)}")
    if swept:
        click.echo(f"shared area: {verb} {len(swept)} group(s) no kept checkpoint references")
    with errors():  # forks of this run's checkpoints whose copy a dead process left half-done
        forks = delete_abandoned(client, run.info.experiment_id, source_run=run_id, dry_run=dry_run)
    for fork_id in forks:
        click.echo(f"{verb:>12} run {fork_id} (an incomplete fork of this run)")


def _clean_interrupted(
    client: MlflowClient, run: Run, *, force: bool, dry_run: bool
) -> RunClaim | None:
    """Recover interrupted saves as the run's writer; the claim is returned held (``None``
    with ``dry_run`` or when a live writer keeps the run)."""
    if dry_run:
        return None
    # Clean up as the run's writer: no save can start (or be adopted twice) meanwhile.
    try:
        claim = take_run(client, run, force=force, sweep=True)
    except WriterConflictError as exc:
        click.echo(f"{exc} Its in-flight saves and the run's shared area are left alone.")
        return None
    click.echo(
        f"interrupted saves: {len(claim.adopted)} adopted, {len(claim.swept)} failed save(s) "
        "removed"
    )
    return claim


@main.command()
@click.argument("uri")
@click.option("--reason", default="manual", show_default=True, help="Recorded in the pin tag.")
def pin(uri: str, reason: str) -> None:
    """Pin checkpoint URI: retention and gc never delete it (until unpinned)."""
    client = MlflowClient()
    with errors():
        model = resolve(uri, client)
    models.set_pinned(client, model.model_id, reason)
    click.echo(f"pinned {describe(model)} ({reason})")


@main.command()
@click.argument("uri")
def unpin(uri: str) -> None:
    """Unpin checkpoint URI (e.g. one pinned before a loss spike): retention may delete it."""
    client = MlflowClient()
    with errors():
        model = resolve(uri, client)
    if not model.tags.get(tags.PINNED):
        click.echo(f"{describe(model)} is not pinned")
        return
    models.set_pinned(client, model.model_id, None)
    click.echo(f"unpinned {describe(model)} (was: {model.tags[tags.PINNED]})")
