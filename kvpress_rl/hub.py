"""Head patterns on the Hugging Face hub: `hf://OWNER/REPO[@REVISION]` references, downloads and uploads.

`huggingface_hub` loads its parts on first use (`import huggingface_hub` and its `constants` take a
millisecond; `snapshot_download` and `HfApi` bring httpx, about 130 ms), so this module imports the
package at the top and reaches `snapshot_download` and `HfApi` through it when a command needs them;
hub errors are told apart by class name, so that `huggingface_hub.errors` (httpx) is not loaded for that. Offline
(`HF_HUB_OFFLINE`), or without a network, every call here fails in one line that says so and what to do instead; a
folder already in the local cache still loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath

import huggingface_hub
import huggingface_hub.constants

from kvpress_rl.errors import KvrlError

SCHEME = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_TRUE = ("1", "ON", "YES", "TRUE")  # how huggingface_hub reads a boolean environment variable


@dataclass(frozen=True)
class HubRef:
    """`hf://OWNER/REPO` or `hf://OWNER/REPO@REVISION` (a branch, tag or commit; None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return SCHEME + self.repo + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(value: str | PurePath) -> bool:
    """Whether `value` names a hub repository. A `Path("hf://a/b")` reads `hf:/a/b` (paths fold `//`): both count."""
    return str(value).startswith("hf:/")


def parse_hub_ref(value: str | PurePath) -> HubRef:
    text = str(value)
    if not is_hub_ref(text):
        raise KvrlError(f"{text!r} is not a hub reference; expected hf://OWNER/REPO or hf://OWNER/REPO@REVISION")
    rest = text[len("hf:/"):].lstrip("/")
    repo, at, revision = rest.partition("@")
    repo = repo.rstrip("/")
    if not _REPO_ID.fullmatch(repo) or ".." in repo or "--" in repo or (at and not revision.strip()):
        raise KvrlError(f"{text!r} is not a hub reference; expected hf://OWNER/REPO or hf://OWNER/REPO@REVISION "
                        "(letters, digits, '-', '_' and '.' in OWNER and REPO)")
    return HubRef(repo, revision or None)


def check_repo_id(repo: str) -> str:
    """An `OWNER/REPO` to upload to (`hf://` in front is accepted), refused in one line otherwise."""
    return parse_hub_ref(repo if is_hub_ref(repo) else SCHEME + repo).repo


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now, or as huggingface_hub read it when it was imported."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def check_online(action: str, instead: str = "run it where the hub is reachable") -> None:
    """Refuse `action` before anything is written when the hub is switched off; `instead`: what to do."""
    if hub_offline():
        raise KvrlError(f"cannot {action}: the Hugging Face hub is offline here (HF_HUB_OFFLINE=1); {instead}")


def download(ref: HubRef, files: list[str]) -> tuple[Path, str]:
    """Download `files` of the model repository `ref` (or find them in the local cache) with
    `huggingface_hub.snapshot_download`: `(folder, commit hash the revision resolved to)`."""
    offline = hub_offline()
    try:
        folder = Path(huggingface_hub.snapshot_download(ref.repo, revision=ref.revision, allow_patterns=list(files),
                                                        local_files_only=offline))
        if _COMMIT.fullmatch(folder.name):
            revision = folder.name
        else:
            revision = huggingface_hub.HfApi().model_info(ref.repo, revision=ref.revision).sha
    except Exception as err:  # huggingface_hub and httpx raise many types: each becomes one line
        elsewhere = (f"; download the folder where the hub is reachable (`hf download {ref.repo}"
                     f"{f' --revision {ref.revision}' if ref.revision else ''} --local-dir DIR`) and pass DIR")
        raise KvrlError(f"cannot download {ref}: "
                        f"{_reason(err, offline)}{elsewhere if _unreachable(err) else ''}") from None
    return folder, revision


def model_commit(repo: str) -> str | None:
    """The commit a model id resolves to now: asked of the hub when online, else read from the local cache
    (the snapshot that holds its `config.json`); None when neither knows."""
    if not hub_offline():
        try:
            return huggingface_hub.HfApi().model_info(repo).sha
        except Exception:  # no network, a private repository, ...: the cache may still know
            pass
    cached = huggingface_hub.try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        parts = Path(cached).parts
        if "snapshots" in parts and parts.index("snapshots") + 1 < len(parts):
            return parts[parts.index("snapshots") + 1]
    return None


def upload(folder: Path, repo: str, message: str) -> str:
    """Create the model repository `repo` if needed and upload `folder` into it: the commit's URL. Called once
    `folder` is written (`kvrl export --push-to-hub`): a failure says how to upload it later."""
    check_online(f"push to hf://{repo}")
    try:
        api = huggingface_hub.HfApi()
        api.create_repo(repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
    except Exception as err:
        raise KvrlError(f"{folder} was written but uploading it to hf://{repo} failed: {_reason(err, False)}; "
                        f"upload it later with `hf upload {repo} {folder}`") from None
    return str(getattr(commit, "commit_url", "") or f"hf://{repo}")


_UNREACHABLE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "TimeoutException",
                "ConnectionError"}


def _unreachable(err: Exception) -> bool:
    """Whether a hub call failed for want of the hub (offline, no network), not for what it asked."""
    return bool({cls.__name__ for cls in type(err).__mro__} & _UNREACHABLE)


def _reason(err: Exception, offline: bool) -> str:
    """What went wrong with a hub call, in a few words (classes of `huggingface_hub.errors`, by name)."""
    kinds = {cls.__name__ for cls in type(err).__mro__}
    if offline and kinds & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        return "the Hugging Face hub is offline here (HF_HUB_OFFLINE=1) and the folder is not in the local cache"
    if "OfflineModeIsEnabled" in kinds:
        return "the Hugging Face hub is offline here (HF_HUB_OFFLINE=1)"
    if "RevisionNotFoundError" in kinds:
        return "the repository has no such revision"
    if "RepositoryNotFoundError" in kinds:  # also a gated repository
        return "no such model repository, or it is private or gated (log in with `hf auth login`)"
    if _unreachable(err):
        return "the Hugging Face hub cannot be reached (no network?)" + (" and the folder is not in the local cache"
                                                                          if "LocalEntryNotFoundError" in kinds else "")
    if "HfHubHTTPError" in kinds and getattr(getattr(err, "response", None), "status_code", None) in (401, 403):
        return "not allowed (log in with `hf auth login`, with a token that may write to this repository)"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}{': ' + text[0] if text else ''}"
