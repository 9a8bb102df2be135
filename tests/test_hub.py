"""Hugging Face Hub ids (`clusterfuse.models.hub`): resolved through a local fake Hub cache with the Hub
offline (``HF_HUB_OFFLINE``), revisions by branch, tag and commit, and one clear error when not cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from clusterfuse.cli.main import main
from clusterfuse.models.config import ConfigError
from clusterfuse.models.hub import download_hub_model, parse_hub_id
from clusterfuse.models.loader import load_config, load_model
from tests.fixtures_models import tiny_llama

MAIN, TAGGED = "a" * 40, "b" * 40


def byte_vocab_llama() -> torch.nn.Module:
    """A tiny tied Llama whose vocabulary holds the byte tokenizer's ids (the CLI runs it without a tokenizer)."""
    import transformers

    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def fake_snapshot(cache: Path, repo: str, commit: str, model: torch.nn.Module, refs: tuple[str, ...]) -> Path:
    """``model`` saved as the Hub cache holds a download: models--org--name/snapshots/<commit>/ with
    refs/<ref> naming the commit (real caches hold symlinks into blobs/; files read the same)."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    model.save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch) -> Path:
    """An offline Hub over a cache in ``tmp_path`` (the values huggingface_hub reads from HF_HUB_OFFLINE and
    HF_HUB_CACHE at import, set as those variables would have set them)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_are_recognised() -> None:
    assert parse_hub_id("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    assert parse_hub_id("meta-llama/Llama-3.2-1B@v1.0") == ("meta-llama/Llama-3.2-1B", "v1.0")
    assert parse_hub_id("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for not_an_id in ("llama-3-8b", "/abs/path", "./rel/dir", "a/b/c", "org/../x", "org/name@", "org name/x",
                      # revisions the Hub client would join into a path outside the cache (refs/<revision>)
                      "org/name@/etc/passwd", "org/name@refs//x", "org/name@refs/../../x", "org/name@x/"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_cached_hub_model_loads_offline(offline_hub: Path) -> None:
    main_model, tagged_model = tiny_llama(), byte_vocab_llama()
    fake_snapshot(offline_hub, "org/tiny", MAIN, main_model, ("main",))
    fake_snapshot(offline_hub, "org/tiny", TAGGED, tagged_model, ("v2",))

    loaded = load_model("org/tiny", dtype=None, progress=False)
    assert loaded.source == "hub:org/tiny" and not loaded.config.tie_word_embeddings
    state = main_model.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in loaded.weights.items())
    for spec in ("org/tiny@v2", f"org/tiny@{TAGGED}"):  # a tag through refs/, a commit directly
        assert load_config(spec).tie_word_embeddings, spec
    assert main(["generate", "--model", "org/tiny", "--revision", "v2", "--device", "cpu", "-n", "2", "--quiet",
                 "hi"]) == 0


def test_not_cached_offline_is_one_clear_error(offline_hub: Path, capsys) -> None:
    with pytest.raises(ConfigError, match=r"model: org/missing@v3 is not in the Hugging Face cache .* HF_HUB_OFFLINE "
                                          r"is set"):
        load_model("org/missing@v3", progress=False)
    assert main(["generate", "--model", "Qwen/Qwen3-8B", "--device", "cpu", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Qwen/Qwen3-8B is not in the Hugging Face cache" in err[0]


def test_revision_needs_a_hub_id(capsys) -> None:
    for bad in ("/etc/passwd", "../x", "a//b"):
        assert main(["generate", "--model", "org/x", "--revision", bad, "--device", "cpu", "x"]) == 2
        assert "argument --revision: expected a branch, tag or commit hash" in capsys.readouterr().err
    assert main(["generate", "--model", "smollm2-135m", "--revision", "v1", "--device", "cpu", "x"]) == 2
    assert "--revision: applies to a Hugging Face Hub id" in capsys.readouterr().err
    assert main(["generate", "--model", "org/x@v1", "--revision", "v2", "--device", "cpu", "x"]) == 2


def test_snapshot_others_could_change_is_refused(offline_hub: Path, tmp_path: Path) -> None:
    snapshot = fake_snapshot(offline_hub, "org/tiny", MAIN, tiny_llama(), ("main",))
    # The Hub client's own layout, a link into the repository's blobs/, is read as before.
    blob = snapshot.parent.parent / "blobs" / "c0ffee"
    blob.parent.mkdir()
    (snapshot / "config.json").rename(blob)
    (snapshot / "config.json").symlink_to(Path("../../blobs/c0ffee"))
    assert load_config("org/tiny").hidden_size == tiny_llama().config.hidden_size

    outside = tmp_path / "elsewhere.json"
    outside.write_text(blob.read_text())
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(outside)
    with pytest.raises(ConfigError, match=r"model: org/tiny: config.json in the Hugging Face cache points outside"):
        load_model("org/tiny", progress=False)
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to(Path("../../blobs/c0ffee"))

    snapshot.parent.chmod(0o777)  # a folder of the cache anyone may write to
    try:
        with pytest.raises(ConfigError, match=r"model: org/tiny: the Hugging Face cache folder .*snapshots may be "
                                              r"written by anyone \(mode 777\)"):
            load_config("org/tiny")
    finally:
        snapshot.parent.chmod(0o755)


@pytest.mark.parametrize("progress", [True, False])
def test_quiet_download_draws_no_progress_bar(progress: bool, monkeypatch, tmp_path: Path) -> None:
    """``progress=False`` (the CLI's --quiet) reaches snapshot_download as a bar class that draws nothing."""
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert download_hub_model("org/name", progress=progress) == tmp_path
    if progress:
        assert seen["tqdm_class"] is None  # huggingface_hub's own bars
    else:
        bar = seen["tqdm_class"](total=3)
        assert bar.disable
        bar.close()
