from types import SimpleNamespace

import pytest
import torch

from kvdrive.errors import KvdriveError
from kvdrive.storage.layout import ALIGN, GroupKey, GroupLayout, align_up

LLAMA_8B = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=8, head_dim=128)


def test_llama_8b_group_is_64_kib():
    lay = GroupLayout.from_config(LLAMA_8B, torch.bfloat16, 16)
    assert lay.token_bytes == 4096
    assert lay.group_bytes == 64 << 10 == lay.slot_bytes
    assert lay.slot_shape == (2, 8, 16, 128)
    assert lay.name == "kv2-h8-g16-d128-bfloat16"


def test_slot_is_aligned_up():
    lay = GroupLayout(2, 1, 64, torch.float16, 4)  # 1 KiB group
    assert lay.group_bytes == 1024
    assert lay.slot_bytes == ALIGN
    assert align_up(1) == ALIGN and align_up(ALIGN) == ALIGN and align_up(ALIGN + 1) == 2 * ALIGN


def test_views_round_trip():
    lay = GroupLayout(2, 2, 8, torch.bfloat16, 4)
    groups = torch.randn(3, *lay.slot_shape).to(torch.bfloat16)
    words = lay.as_words(groups)
    assert words.shape == (3, lay.group_words) and words.dtype == torch.int32
    rows = torch.zeros(3, lay.slot_bytes, dtype=torch.uint8)
    rows[:, : lay.group_bytes] = words.view(torch.uint8).view(3, -1)
    assert torch.equal(lay.as_groups(rows), groups)


def test_validation():
    with pytest.raises(KvdriveError):
        GroupLayout(0, 1, 8, torch.float16, 4)
    lay = GroupLayout(1, 1, 8, torch.float16, 4)
    with pytest.raises(ValueError):
        lay.as_words(torch.zeros(2, 2, 1, 4, 8))  # wrong dtype
    assert GroupKey(1, 2, 3).layer == 2
