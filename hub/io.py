"""Hugging Face Hub I/O for draft heads: resolve a head reference, plan and push an upload.

A head reference is a local folder or a Hub repo id (`user/name`, optionally `user/name@revision`).
`resolve_head` is the one code path for both: an existing folder is returned as it is, anything
else must be a valid repo id and is fetched with `huggingface_hub.snapshot_download` (only the
files a head consists of). Offline (`HF_HUB_OFFLINE=1`) that reads the local Hub cache and fails
with one clear error when the head is not there.

Pushing uses `HfApi().upload_folder`. The token is whatever `huggingface_hub` finds (`HF_TOKEN` or
the `hf auth login` cache); this module never reads, prints or stores it.
"""
from __future__ import annotations

import re
from pathlib import Path

from dspark.core.errors import DSparkError

# Files that make up a head; a download fetches nothing else (no training state exists in an export).
HEAD_FILES = ["config.json", "model.safetensors", "README.md", "vllm/*", "sglang/*"]
# The file `dspark export` marks its own folders with (hub/export.py); it never goes to the Hub.
EXPORT_MARKER = ".dspark-export"

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^({_NAME})/({_NAME})$")


def validate_repo_id(repo_id: str) -> str:
    """`user/name` with Hub-legal characters (letters, digits, '-', '_', '.'; no leading/trailing
    '-' or '.', no '--' or '..', at most 96 characters per part). Returns it; raises DSparkError."""
    rid = str(repo_id or "").strip()
    m = _REPO_ID.match(rid)
    if not m or any(len(p) > 96 or "--" in p or ".." in p for p in m.groups()) or rid.endswith(".git"):
        raise DSparkError(f"repo id '{repo_id}' is not valid: use <user or org>/<name> with letters, digits, "
                          "'-', '_' and '.' (e.g. repo_id=alice/smollm2-135m-dspark)")
    return rid


def split_ref(ref: str) -> tuple[str, str | None]:
    """'user/name@rev' → ('user/name', 'rev'); without '@' the revision is None."""
    rid, _, rev = str(ref).partition("@")
    return rid, (rev or None)


def is_repo_ref(ref) -> bool:
    """Whether `ref` reads as a Hub repo id (`user/name[@rev]`) rather than a path."""
    return bool(_REPO_ID.match(split_ref(str(ref))[0])) and not str(ref).startswith((".", "/", "~"))


def resolve_head(ref: str | Path, revision: str | None = None) -> Path:
    """A local folder holding the head `ref` names: `ref` itself when it is a folder, else the Hub
    snapshot of repo id `ref` (at `revision` or the `@rev` suffix)."""
    path = Path(str(ref)).expanduser()
    if path.is_dir():
        return path
    rid, rev = split_ref(str(ref))
    if not _REPO_ID.match(rid):
        raise DSparkError(f"head '{ref}' is neither a folder nor a Hub repo id (user/name): "
                          "run `dspark train` first or pass head=<folder or user/name>")
    validate_repo_id(rid)
    return Path(_download(rid, revision or rev))


def _download(repo_id: str, revision: str | None) -> str:
    """Fetch a head repo's files into the Hub cache; the one place that touches the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HEAD_FILES)
    except LocalEntryNotFoundError:
        raise DSparkError(f"head '{repo_id}' is not a local folder, nor in the local Hub cache, and the Hub is "
                          "unreachable or offline (HF_HUB_OFFLINE=1): check the path or connect once") from None
    except HfHubHTTPError as e:
        raise DSparkError(f"cannot download head '{repo_id}' from the Hub: {str(e).splitlines()[0]}") from None


def load_head(ref: str | Path, revision: str | None = None):
    """The head in folder `ref`, or in Hub repo `ref` (`user/name[@revision]`): the one path for both."""
    from dspark.models.heads import read_head

    return read_head(resolve_head(ref, revision))


def upload_plan(folder: str | Path) -> list[dict]:
    """Exactly what `push_folder` uploads: every file under `folder` but the export marker, relative
    path and size."""
    root = Path(folder)
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p != root / EXPORT_MARKER]


def push_folder(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str = "Upload DSpark draft head") -> str:
    """Create `repo_id` if needed and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = validate_repo_id(repo_id)
    api = HfApi()
    try:
        api.whoami()
    except Exception:   # no token, an expired one, or no network: say which fix applies, never the token
        raise DSparkError("not logged in to the Hugging Face Hub (or it is unreachable): run `hf auth login` "
                          "or set HF_TOKEN, then retry") from None
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                          ignore_patterns=[EXPORT_MARKER])
    except HfHubHTTPError as e:
        raise DSparkError(f"upload to '{repo_id}' failed: {str(e).splitlines()[0]}") from None
    return str(url)
