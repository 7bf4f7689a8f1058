"""kvdrive's runner against Hugging Face transformers on the same real weights (CPU, fp32).

transformers loads the GGUF on its own (its own dequantization, q/k un-permutation and
norm handling), so these tests also check kvdrive's GGUF loader.
"""

import pytest
import torch

from kvdrive.cache.contiguous import ContiguousKVCache
from kvdrive.models import embedded

TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never took up "
    "any book but the Baronetage; there he found occupation for an idle hour, and consolation in a distressed "
    "one; there his faculties were roused into admiration and respect, by contemplating the limited remnant of "
    "the earliest patents; there any unwelcome sensations, arising from domestic affairs changed naturally into "
    "pity and contempt as he turned over the almost endless creations of the last century; and there, if every "
    "other leaf were powerless, he could read his own history with an interest which never failed. "
)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _prompt(tokenizer, n_tokens: int) -> torch.Tensor:
    ids = tokenizer(TEXT * 8)["input_ids"][:n_tokens]
    assert len(ids) == n_tokens
    return torch.tensor([ids])


def _our_logits(loaded, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    cache = ContiguousKVCache(loaded.config, 1, ids.shape[1], torch.device("cpu"), torch.float32)
    cache.add(0, ids.shape[1])
    out = []
    for begin in range(0, ids.shape[1], chunk):
        piece = ids[:, begin : begin + chunk]
        batch = cache.plan([0], piece.shape[1])
        out.append(loaded.model(piece, cache, batch, all_logits=True)[0])
        cache.commit(batch)
    return torch.cat(out)


def _greedy(loaded, ids: torch.Tensor, n: int) -> list[int]:
    from kvdrive.engine import generation
    from kvdrive.engine.sampling import SamplingParams

    req = generation.Request(0, ids[0].tolist(), SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), n)
    cache = ContiguousKVCache(loaded.config, 1, ids.shape[1] + n, torch.device("cpu"), torch.float32)
    list(generation.run(loaded.model, cache, [req], loaded.config.eos_token_ids, None))
    return req.output_ids


def _check(loaded, hf, n_tokens: int, chunk: int):
    ids = _prompt(loaded.tokenizer, n_tokens)
    with torch.no_grad():
        ref = hf(ids).logits[0]
    ours = _our_logits(loaded, ids, chunk)
    # fp32 end to end through ~20-30 layers: differences come only from summation order.
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-3)
    with torch.no_grad():
        hf_out = hf.generate(
            ids,
            max_new_tokens=64,
            min_new_tokens=64,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            pad_token_id=0,
        )[0, n_tokens:].tolist()
    assert _greedy(loaded, ids, 64) == hf_out


def test_smollm2_matches_transformers(smollm2):
    # 300 tokens in one prefill, plus the same prompt in chunks of 128 (exercises cached prefixes).
    _check(smollm2, _hf(embedded.smollm2_path()), 300, chunk=128)


def test_gemma3_matches_transformers(gemma3):
    # 700 tokens > the 512-token sliding window, so local and global layers both matter.
    _check(gemma3, _hf(embedded.gemma3_path()), 700, chunk=256)


def test_gemma3_sliding_window_is_applied(gemma3):
    """Regression guard: with every layer global the logits at 700 tokens must differ."""
    import dataclasses

    from kvdrive.models.decoder import DecoderLM

    cfg = gemma3.config
    ids = _prompt(gemma3.tokenizer, 700)
    ours = _our_logits(gemma3, ids, 700)[-1]
    all_global = dataclasses.replace(cfg, sliding_windows=(None,) * cfg.num_hidden_layers)
    other = DecoderLM(all_global)
    other.load_state_dict(gemma3.model.state_dict())
    cache = ContiguousKVCache(all_global, 1, 700, torch.device("cpu"), torch.float32)
    cache.add(0, 700)
    logits = other(ids, cache, cache.plan([0], 700))[0]
    assert (logits - ours).abs().max() > 1e-2


def test_a_tokenizer_conversion_into_short_pieces_is_refused():
    """Regression: transformers 5.17 turns Gemma 3's GGUF tokenizer into pieces of 1-3
    characters ('▁w', 'at', 'er' for ' water'): 35 tokens for SAMPLE's 78 characters."""
    from pathlib import Path

    from kvdrive.errors import KvdriveError
    from kvdrive.models.gguf_loader import check_tokenizer

    def per_char(text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}

    def pieces_of(n):
        return lambda text, add_special_tokens=False: {"input_ids": list(range(n))}

    def per_word(text, add_special_tokens=False):
        return {"input_ids": text.split()}

    for broken in (per_char, pieces_of(35)):
        with pytest.raises(KvdriveError, match="upgrade transformers"):
            check_tokenizer(broken, Path("gemma.gguf"))
    check_tokenizer(pieces_of(18), Path("gemma.gguf"))  # SmolLM2's and a right Gemma 3 conversion's count
    check_tokenizer(per_word, Path("gemma.gguf"))
    check_tokenizer(per_word, Path("gemma.gguf"))
