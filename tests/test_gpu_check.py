"""tools/gpu_check.py: its CPU path end to end at a tiny size, and the attention stand-in it
gives the reference script."""

from __future__ import annotations

import json
import math
import sys

import gpu_check
import torch

import trainer
from conftest import QUICK_RUN


def test_gpu_check_runs_on_cpu_and_honours_the_environment(tmp_path, quick_corpus, monkeypatch):
    for name, value in {**QUICK_RUN, "DATA_PATH": str(quick_corpus), "MODEL_DIM": "96", "NUM_HEADS": "2",
                        "NUM_KV_HEADS": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SMOKE")  # --tiny brings the profile; the variables above still win over it
    monkeypatch.chdir(tmp_path)
    status = gpu_check.main([str(tmp_path / "out"), "--tiny", "--steps", "2", "--warmup", "1", "--repeats", "2",
                             "--split-steps", "1", "--eval-tokens", "1024"])
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert status == 0 and report["settings"]["model_dim"] == 96 and report["settings"]["smoke"]
    assert report["training"]["steps"] == 2 and len(report["training"]["ms_per_step"]["values"]) == 2
    assert set(report["step_split_ms"]) == {"forward", "backward", "optimiser"} and report["artifact"]["fits"]
    modes = report["evaluation"]["modes"]
    assert list(modes) == ["off", "window", "batch_causal", "shared"] and all(math.isfinite(m["val_bpb"]) for m in modes.values())
    assert [m["legal"] for m in modes.values()] == [True, True, True, False]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| ms per step (mean ± std over repeats) |" in table and "| eval shared: BPB, tokens/s |" in table


def test_the_attention_stand_in_is_this_trainers_attention(tmp_path, monkeypatch):
    (tmp_path / "flash_attn_interface.py").write_text(gpu_check.FLASH_ATTENTION_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    from flash_attn_interface import flash_attn_func

    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    assert torch.allclose(flash_attn_func(q, k, v, causal=True), trainer.causal_attention(q, k, v))
