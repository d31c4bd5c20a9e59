"""`cram push`: the upload plan (files, revision names, card), its execution against the client's API
(a recording stand-in for `HfApi`: no network), failures that leave nothing looking complete, the
messages without a token or offline, and the dry run for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, ModelCard
from safetensors.torch import load_file
from test_train_loop import tiny_run

from cramming import card, hub

pytestmark = pytest.mark.usefixtures("one_thread")
REPO_ID = "someone/crammed-tiny"
CHECKPOINTS = ["step-00000000", "step-00000003"]  # the start-of-run checkpoint and the final one


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    return tiny_run(root)


class FakeApi:
    """The HfApi methods `cram push` calls, recorded; `fail_on` makes one commit fail as a dropped connection."""

    def __init__(self, exists: bool = False, fail_on: str | None = None) -> None:
        self.exists, self.fail_on, self.calls = exists, fail_on, []

    def repo_exists(self, repo_id):
        self.calls.append(("repo_exists", repo_id))
        return self.exists

    def create_repo(self, repo_id, private, exist_ok):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok):
        self.calls.append(("create_branch", branch))

    def create_commit(self, repo_id, operations, commit_message, revision):
        if revision == self.fail_on:
            raise ConnectionError("connection reset")
        self.calls.append(("commit", revision, commit_message, list(operations)))
        return f"https://huggingface.co/{repo_id}/commit/{len(self.calls)}"

    def delete_repo(self, repo_id):
        self.calls.append(("delete_repo", repo_id))


def _materialize(revision: hub.Revision, folder: Path) -> Path:
    folder.mkdir()
    for f in revision.files:
        (folder / f.path_in_repo).write_bytes(f.content if f.content is not None else f.source.read_bytes())
    return folder


def test_plan_of_a_run_with_its_checkpoints(run) -> None:
    plan = hub.plan_push(run, REPO_ID, checkpoints=True, private=True)
    assert [r.name for r in plan.revisions] == ["main", *CHECKPOINTS] and plan.private
    main = plan.revisions[0]
    assert {f.path_in_repo for f in main.files} == {p.name for p in (run / "final").iterdir()}
    assert main.file("model.safetensors").source == run / "final" / "model.safetensors"
    main_card = ModelCard(main.file(card.CARD_NAME).content.decode())
    assert f'model_id = "{REPO_ID}"' in main_card.text and main_card.data.pipeline_tag == "fill-mask"
    for name, rev in zip(CHECKPOINTS, plan.revisions[1:], strict=True):
        assert rev.file("model.safetensors").source == run / "checkpoints" / name / "model.safetensors"
        assert rev.file("config.json").source == run / "final" / "config.json"
        text = ModelCard(rev.file(card.CARD_NAME).content.decode()).text
        assert f'revision="{name}"' in text and "Intermediate checkpoint" in text and f'model_id = "{REPO_ID}"' in text
    # The export folder alone pushes the same main revision.
    assert hub.plan_push(run / "final", REPO_ID).revisions[0] == hub.plan_push(run, REPO_ID).revisions[0]


def test_a_checkpoint_revision_loads_like_the_export(run, tmp_path) -> None:
    from cramming.model import load_model

    rev = hub.plan_push(run, REPO_ID, checkpoints=True).revisions[1]
    model = load_model(_materialize(rev, tmp_path / "rev"))
    saved = load_file(str(run / "checkpoints" / CHECKPOINTS[0] / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert not torch.equal(model.state_dict()[next(iter(saved))], load_model(run / "final").state_dict()[next(iter(saved))])


def test_execute_creates_the_repo_and_commits_each_revision(run) -> None:
    plan = hub.plan_push(run, REPO_ID, revision="v1", checkpoints=True, private=True, message="first crammed model")
    api = FakeApi()
    assert hub.execute(plan, api) == ["v1", *CHECKPOINTS]
    assert api.calls[:2] == [("repo_exists", REPO_ID), ("create_repo", REPO_ID, True)]
    branches = [c[1] for c in api.calls if c[0] == "create_branch"]
    commits = [c for c in api.calls if c[0] == "commit"]
    assert branches == ["v1", *CHECKPOINTS] and [c[1] for c in commits] == ["v1", *CHECKPOINTS]
    assert commits[0][2] == "first crammed model"
    ops = commits[0][3]
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert {op.path_in_repo for op in ops} == {f.path_in_repo for f in plan.revisions[0].files}
    readme = next(op for op in ops if op.path_in_repo == card.CARD_NAME)
    assert readme.path_or_fileobj == plan.revisions[0].file(card.CARD_NAME).content


def test_a_failed_revision_is_named_and_the_pushed_ones_are_complete(run) -> None:
    api = FakeApi(exists=True, fail_on=CHECKPOINTS[1])
    with pytest.raises(hub.PushError, match=rf"could not push revision {CHECKPOINTS[1]}: ConnectionError.*pushed so far: "
                                            rf"main, {CHECKPOINTS[0]}; each revision is one commit"):
        hub.execute(hub.plan_push(run, REPO_ID, checkpoints=True), api)
    assert [c[1] for c in api.calls if c[0] == "commit"] == ["main", CHECKPOINTS[0]]
    assert not any(c[0] == "delete_repo" for c in api.calls)  # it existed before: left as it was


def test_a_repo_created_by_a_push_that_reached_nothing_is_deleted(run) -> None:
    api = FakeApi(exists=False, fail_on="main")
    with pytest.raises(hub.PushError, match="nothing was pushed"):
        hub.execute(hub.plan_push(run, REPO_ID), api)
    assert api.calls[-1] == ("delete_repo", REPO_ID)


def test_what_cannot_be_pushed_is_said(run, tmp_path) -> None:
    with pytest.raises(hub.PushError, match="neither a pretraining run"):
        hub.plan_push(tmp_path, REPO_ID)
    with pytest.raises(hub.PushError, match="--checkpoints needs the run folder"):
        hub.plan_push(_materialize(hub.plan_push(run, REPO_ID).revisions[0], tmp_path / "copy"), REPO_ID, checkpoints=True)


def _cram_push(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "cramming.cli", "push", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**clean, "HF_HOME": str(tmp_path / "hf"), **env})


def test_dry_run_lists_the_upload_for_real(run, tmp_path) -> None:
    out = _cram_push(str(run), "--repo-id", REPO_ID, "--checkpoints", "--dry-run", tmp_path=tmp_path, HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert "dry run, nothing uploaded" in out.stdout and f"repository: {REPO_ID} (public if created now)" in out.stdout
    for name in ("main", *CHECKPOINTS):
        assert f"revision {name}: 7 files" in out.stdout, out.stdout
    assert "README.md" in out.stdout and "(written for this repository)" in out.stdout
    assert "model.safetensors" in out.stdout and "modeling_crammed_bert.py" in out.stdout


def test_without_a_token_or_offline_nothing_starts(run, tmp_path) -> None:
    out = _cram_push(str(run), "--repo-id", REPO_ID, tmp_path=tmp_path)
    assert out.returncode == 2 and "no Hugging Face token: log in with `hf auth login`" in out.stderr, out.stderr
    out = _cram_push(str(run), "--repo-id", REPO_ID, tmp_path=tmp_path, HF_HUB_OFFLINE="1", HF_TOKEN="hf_x")
    assert out.returncode == 2 and "HF_HUB_OFFLINE is set" in out.stderr and "Traceback" not in out.stderr
    assert _cram_push("--help", tmp_path=tmp_path).returncode == 0
