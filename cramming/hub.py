"""`cram push RUN_OR_EXPORT --repo-id ID`: upload an export (and, on request, the run's checkpoints) to a
Hugging Face Hub model repository with huggingface_hub.

The export goes to `--revision` (default main) as one commit, its card's usage code loading the repo
id. With `--checkpoints`, each complete checkpoint of the run goes to its own branch named after it
(e.g. `step-00001234`), as a folder transformers loads: the checkpoint's weights with the export's
config, tokenizer and code, and the card headed by a note. `--dry-run` lists what would be uploaded
and touches no network.

Nothing is left half-uploaded as if complete: each revision is one commit, which the Hub applies
whole or not at all; a repository this push created is deleted again when no commit reached it; and a
failure names the revisions that were pushed and the one that was not. Without a token, or with
HF_HUB_OFFLINE set, the push stops before any request, saying what to do.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cramming import card, runs
from cramming.errors import CrammingError

log = logging.getLogger(__name__)

EXPORT_MARKER = "config.json"
EXPORT_DIR = "final"
WEIGHTS = "model.safetensors"


class PushError(CrammingError):
    """A push that cannot start, or that stopped part-way (the message says what reached the Hub)."""


@dataclass(frozen=True)
class Upload:
    """One file of a revision: a file on disk, or generated content (a card)."""

    path_in_repo: str
    source: Path | None = None
    content: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.content) if self.content is not None else self.source.stat().st_size  # type: ignore[union-attr]


@dataclass(frozen=True)
class Revision:
    """One commit: a branch and the files it holds."""

    name: str
    message: str
    files: tuple[Upload, ...]

    def file(self, path_in_repo: str) -> Upload:
        return next(f for f in self.files if f.path_in_repo == path_in_repo)


@dataclass(frozen=True)
class PushPlan:
    repo_id: str
    private: bool
    revisions: tuple[Revision, ...]


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(the export folder, its pretraining run folder or None) of a run folder or an export folder."""
    path = Path(path).expanduser()
    if (path / EXPORT_MARKER).is_file():
        parent = path.parent
        return path, parent if path.name == EXPORT_DIR and runs.is_pretrain_run(parent) else None
    if (path / EXPORT_DIR / EXPORT_MARKER).is_file():
        return path / EXPORT_DIR, path
    if runs.is_pretrain_run(path):
        raise PushError(f"{path} has no export ({EXPORT_DIR}/): the run did not finish; resume it with "
                        f"`cram pretrain resume={path}` first")
    raise PushError(f"{path} is neither a pretraining run (outputs/pretrain/<run>) nor an export folder "
                    f"(one with {EXPORT_MARKER}, e.g. outputs/pretrain/<run>/{EXPORT_DIR})")


def _export_files(export: Path, skip: tuple[str, ...] = ()) -> list[Upload]:
    """The export's files as they are on disk, but its card (which each revision writes for itself)."""
    return [Upload(p.name, p) for p in sorted(export.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name not in (card.CARD_NAME, *skip)]


def _card(export: Path, repo_id: str) -> str:
    return card.for_repo(card.card_text(export), repo_id)


def _checkpoint_revisions(run_dir: Path, export: Path, repo_id: str) -> list[Revision]:
    """Each complete checkpoint (its checksums verified) as a branch loadable like the export."""
    from cramming.train.checkpoint import CHECKPOINT_DIR, META, verify_checkpoint

    folders = sorted(p for p in (run_dir / CHECKPOINT_DIR).glob("step-*") if (p / META).is_file())
    if not folders:
        raise PushError(f"--checkpoints: {run_dir / CHECKPOINT_DIR} holds no complete checkpoint")
    shared = _export_files(export, skip=(WEIGHTS,))
    revisions = []
    for folder in folders:
        meta = verify_checkpoint(folder)
        text = card.for_checkpoint(_card(export, repo_id), int(meta["step"]), folder.name, meta.get("elapsed_s"))
        files = (Upload(card.CARD_NAME, content=text.encode()), Upload(WEIGHTS, folder / WEIGHTS), *shared)
        revisions.append(Revision(folder.name, f"Checkpoint {folder.name} of {run_dir.name} (cram push)",
                                  tuple(sorted(files, key=lambda f: f.path_in_repo))))
    return revisions


def plan_push(path: str | Path, repo_id: str, revision: str = "main", private: bool = False,
              checkpoints: bool = False, message: str | None = None) -> PushPlan:
    """What `cram push` uploads: the export to `revision`, then each checkpoint to its own branch."""
    export, run_dir = locate(path)
    if checkpoints and run_dir is None:
        raise PushError(f"--checkpoints needs the run folder (it holds checkpoints/), not the export {export}")
    name = run_dir.name if run_dir else export.name
    files = (Upload(card.CARD_NAME, content=_card(export, repo_id).encode()), *_export_files(export))
    revisions = [Revision(revision, message or f"Upload {name} (cram push)",
                          tuple(sorted(files, key=lambda f: f.path_in_repo)))]
    if checkpoints:
        revisions += _checkpoint_revisions(run_dir, export, repo_id)  # type: ignore[arg-type]
    return PushPlan(repo_id, private, tuple(revisions))


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def describe(plan: PushPlan) -> str:
    """The plan as the dry run prints it: per revision, its commit message and files with sizes."""
    lines = [f"repository: {plan.repo_id} ({'private' if plan.private else 'public'} if created now)"]
    for rev in plan.revisions:
        total = sum(f.size for f in rev.files)
        lines.append(f"revision {rev.name}: {len(rev.files)} files, {_size(total)}, message {rev.message!r}")
        lines += [f"  {f.path_in_repo:<28} {_size(f.size):>9}{'  (written for this repository)' if f.content else ''}"
                  for f in rev.files]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The upload
# ---------------------------------------------------------------------------------------------


def check_ready() -> None:
    """Stop before any request when the Hub cannot be reached or written to from here."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PushError("HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it to push, or add --dry-run "
                        "to list what would be uploaded")
    if get_token() is None:
        raise PushError("no Hugging Face token: log in with `hf auth login` (or set HF_TOKEN) with a token that "
                        "may write to the repository; --dry-run lists what would be uploaded without one")


def _operations(rev: Revision) -> list[Any]:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(f.path_in_repo, f.content if f.content is not None else str(f.source)) for f in rev.files]


def execute(plan: PushPlan, api: Any) -> list[str]:
    """Push `plan` through `api` (an `HfApi`); returns the revisions pushed, with their commit URLs logged."""
    created = not _call(lambda: api.repo_exists(plan.repo_id), "reach the Hub", [])
    _call(lambda: api.create_repo(plan.repo_id, private=plan.private, exist_ok=True), "create the repository", [])
    pushed: list[str] = []
    try:
        for rev in plan.revisions:
            if rev.name != "main":
                _call(lambda rev=rev: api.create_branch(plan.repo_id, branch=rev.name, exist_ok=True),
                      f"create the branch {rev.name}", pushed)
            info = _call(lambda rev=rev: api.create_commit(plan.repo_id, _operations(rev), commit_message=rev.message,
                                                           revision=rev.name), f"push revision {rev.name}", pushed)
            log.info("pushed %s: %s", rev.name, getattr(info, "commit_url", info))
            pushed.append(rev.name)
    except PushError:
        if created and not pushed:  # an empty repository this push made is not left behind
            try:
                api.delete_repo(plan.repo_id)
            except Exception as err:  # the push's own error is the one to report
                log.warning("could not delete the empty repository %s that this push created: %s", plan.repo_id, err)
        raise
    return pushed


def _call(fn: Any, what: str, pushed: list[str]) -> Any:
    """`fn()`, any failure turned into a PushError saying what reached the Hub. The client raises the
    transport errors of whichever HTTP library its version uses (requests, httpx), hence `Exception`."""
    try:
        return fn()
    except Exception as err:
        done = f"pushed so far: {', '.join(pushed)}" if pushed else "nothing was pushed"
        raise PushError(f"could not {what}: {type(err).__name__}: {err}. {done}; each revision is one commit, so "
                        "none is partly there; run the same command again to push the rest") from None


def main(argv: list[str]) -> int:
    """`cram push RUN_OR_EXPORT --repo-id ID [--revision R] [--private] [--checkpoints] [--message M] [--dry-run]`."""
    parser = argparse.ArgumentParser(
        prog="cram push", description="Upload an export of `cram pretrain` (and, with --checkpoints, each of the run's "
        "checkpoints as its own branch) to a Hugging Face Hub model repository. Needs a token (`hf auth login`).")
    parser.add_argument("path", metavar="RUN_OR_EXPORT", help="a pretraining run folder, or an export folder (final/)")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, e.g. your-name/crammed-bert")
    parser.add_argument("--revision", default="main", help="branch the export goes to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repository private (if it is created now)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="also push each complete checkpoint of the run, each to a branch named after it")
    parser.add_argument("--message", default=None, help="commit message of the export's revision")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    args = parser.parse_args(argv)
    plan = plan_push(args.path, args.repo_id, args.revision, args.private, args.checkpoints, args.message)
    if args.dry_run:
        print(f"cram push: dry run, nothing uploaded\n{describe(plan)}")
        return 0
    check_ready()
    from huggingface_hub import HfApi

    pushed = execute(plan, HfApi())
    print(f"cram push: pushed {', '.join(pushed)} to https://huggingface.co/{plan.repo_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
