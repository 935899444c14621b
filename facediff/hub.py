"""Sharing a trained pipeline on the Hub: exactly the files a user needs, in one commit."""

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

# What a saved pipeline folder holds for its users; a training output folder also has checkpoints, logs, sample
# grids of earlier steps and training_args.json (local paths), none of which is uploaded.
SHARED_FILES = [
    "model_index.json",
    "pipeline_facediff.py",
    "scheduling_facediff.py",
    "scheduler/*",
    "unet/*",
    "README.md",
    "sample_grid.png",
]


def push_pipeline_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload facediff pipeline",
) -> CommitInfo:
    """
    Create `repo_id` if needed and upload the pipeline in `folder` as one commit.

    Args:
        folder (`str` or `os.PathLike`):
            A folder written by `FaceDiffPipeline.save_pretrained` or by training.
        repo_id (`str`):
            The Hub model repo, `user/name`.
        private (`bool`, *optional*):
            Create the repo as private.
        token (`str`, *optional*):
            A Hub token; default: `huggingface_hub`'s usual sources (HF_TOKEN, the saved login). Never logged.
        commit_message (`str`):
            The commit's title.

    Returns:
        `huggingface_hub.CommitInfo`
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} holds no saved pipeline (no model_index.json): save or train one first.")
    shared = sorted({path for pattern in SHARED_FILES for path in folder.glob(pattern) if path.is_file()})
    operations = [CommitOperationAdd(str(path.relative_to(folder)), str(path)) for path in shared]
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
