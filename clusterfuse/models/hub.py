"""Hugging Face Hub ids (``--model Qwen/Qwen3-8B``, ``org/name@revision``): resolved to a local snapshot.

``huggingface_hub.snapshot_download`` does the work: its cache (``HF_HOME`` / ``HF_HUB_CACHE``),
its offline mode (``HF_HUB_OFFLINE=1``: the cached snapshot or an error, no network), its
progress bars and its authentication.  Only what the loaders read is fetched (`ALLOW_PATTERNS`):
the config, the tokenizer files and the safetensors (with their index), never ``*.bin``,
``*.pth`` or a repository's GGUF variants.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

from clusterfuse.models.config import ConfigError

#: Files of a repository the loaders read; nothing else is downloaded.
ALLOW_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "*.safetensors", "model.safetensors.index.json")

# A branch, tag or commit hash. Branches may hold '/' between non-empty parts (refs/pr/3); never a
# leading '/' nor '..': the Hub client joins the revision into cache paths (refs/<revision>), and
# refs//etc/passwd would be /etc/passwd.
_REVISION = r"[\w.-]{1,255}(?:/[\w.-]{1,255})*"
# org/name as the Hub spells repository ids (letters, digits, '-', '_', '.'), then an optional @revision.
_HUB_ID = re.compile(rf"(?P<repo>[A-Za-z0-9][\w.-]{{0,95}}/[A-Za-z0-9][\w.-]{{0,95}})(?:@(?P<rev>{_REVISION}))?")


def is_revision(text: str) -> bool:
    """Whether ``text`` is a revision the Hub cache can hold safely (see `_REVISION`)."""
    return len(text) <= 255 and ".." not in text and re.fullmatch(_REVISION, text) is not None


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` looks like ``org/name`` or ``org/name@revision``, else None."""
    m = _HUB_ID.fullmatch(spec)
    if m is None or ".." in spec or (m["rev"] is not None and not is_revision(m["rev"])):
        return None
    return m["repo"], m["rev"]


def download_hub_model(repo_id: str, revision: str | None = None, *, progress: bool = True) -> Path:
    """The local snapshot directory of ``repo_id`` at ``revision`` (default: main), downloaded into the
    Hugging Face cache if it is not there (with its progress bars unless ``progress`` is False); a
    ``ConfigError`` naming what failed."""
    # Imported here: local directories, presets and GGUF files never touch the Hub client.
    from huggingface_hub import constants, snapshot_download
    from tqdm.auto import tqdm

    class SilentBar(tqdm):  # what snapshot_download draws its bars with, told to draw nothing
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = repo_id + (f"@{revision}" if revision else "")
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(ALLOW_PATTERNS),
                                          tqdm_class=None if progress else SilentBar))
    except LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ConfigError(f"model: {shown} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                          "download it once online, or pass a local directory") from err
    except RevisionNotFoundError as err:
        raise ConfigError(f"revision: {revision!r} is not a branch, tag or commit of {repo_id}") from err
    except GatedRepoError as err:
        raise ConfigError(f"model: {repo_id} is gated on the Hugging Face Hub: accept its terms on the model page "
                          "and log in (`hf auth login`)") from err
    except RepositoryNotFoundError as err:
        raise ConfigError(f"model: {shown!r} is not a local path, a preset, nor a Hugging Face Hub repository "
                          "(or it is private: log in with `hf auth login`)") from err
    except (HfHubHTTPError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"model: cannot download {shown} from the Hugging Face Hub: {first}") from err
    check_snapshot(snapshot, shown)
    return snapshot


def check_snapshot(snapshot: Path, shown: str) -> None:
    """Refuse a cached snapshot that others could have changed under us: one whose files resolve
    outside its repository's cache folder (``models--org--name``, where the Hub client keeps the
    blobs its snapshot links point to), or that lies under a folder anyone may write to (and is not
    sticky, as /tmp is).  A cache shared by a group stays usable; its files are still parsed as
    untrusted input."""
    repo_root = snapshot.resolve().parent.parent
    for entry in sorted(snapshot.rglob("*")):
        target = entry.resolve()
        if not target.is_relative_to(repo_root):
            raise ConfigError(f"model: {shown}: {entry.relative_to(snapshot)} in the Hugging Face cache points "
                              f"outside its repository's folder {repo_root} (to {target}); refusing to read it")
    for folder in (snapshot.resolve(), *snapshot.resolve().parents):
        mode = folder.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise ConfigError(f"model: {shown}: the Hugging Face cache folder {folder} may be written by anyone "
                              f"(mode {stat.S_IMODE(mode):o}); refusing to read a model from it (chmod o-w {folder})")
