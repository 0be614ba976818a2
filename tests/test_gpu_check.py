"""tools/gpu_check.py: its CPU path end to end at a tiny size, the attention stand-in it
gives the record's script, and a comparison that did not happen saying so."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

from tools import gpu_check
import torch

from trainer.model import causal_attention
from trainer.runtime import Runtime
from trainer.settings import Hyperparameters
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
    assert [(m["causal"], m["accepted"]) for m in modes.values()] == [(True, True), (True, False), (True, False), (False, False)]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| ms per step (mean ± std over repeats) |" in table and "| eval shared: BPB, tokens/s |" in table


def test_the_attention_stand_in_is_this_trainers_attention(tmp_path, monkeypatch):
    (tmp_path / "flash_attn_interface.py").write_text(gpu_check.FLASH_ATTENTION_STAND_IN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn_interface", raising=False)
    from flash_attn_interface import flash_attn_func

    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    assert torch.allclose(flash_attn_func(q, k, v, causal=True), causal_attention(q, k, v))


def test_a_record_script_that_fails_is_said_loudly(tmp_path, monkeypatch):
    script = tmp_path / "record.py"
    script.write_text("import sys\nprint('CUDA is required', file=sys.stderr)\nsys.exit(1)\n")
    hp = Hyperparameters.from_env({"SMOKE": "1"})
    numbers = gpu_check.run_record(script, hp, Runtime(), tmp_path, timeout=120)
    assert numbers["exit_status"] != 0 and "CUDA is required" in numbers["failed"]
    assert not list(tmp_path.glob("gpu_check_record_*")) and (tmp_path / "record_output.txt").exists()
    report = {"training": {"ms_per_step": {"mean": 1.0, "std": 0.0}, "tokens_per_second": 1.0, "peak_memory_mib": None,
                           "compile_and_warmup_seconds": 1.0}, "step_split_ms": {"forward": 1.0}, "settings": {"train_batch_tokens": 1},
              "artifact": {"gptq_and_write_seconds": 1.0, "total_bytes": 1}, "evaluation": {"modes": {}},
              "environment": {"device": "CPU", "devices": 1, "torch": "x", "attention_backend": "sdpa"}, "record": numbers}
    assert "**The record's script did not run: exit status" in gpu_check.table(report)


def test_a_command_that_times_out_leaves_no_process_behind(tmp_path):
    marker = tmp_path / "grandchild.pid"
    script = tmp_path / "record.py"
    script.write_text("import subprocess, sys, time\n"
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True,\n"
                      "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                      f"open({str(marker)!r}, 'w').write(str(child.pid))\nprint('started', flush=True)\ntime.sleep(600)\n")
    started = time.perf_counter()
    status, output = gpu_check.run_with_timeout([sys.executable, str(script)], tmp_path, dict(os.environ), timeout=1)
    assert status is None and output == "started\n" and time.perf_counter() - started < 30
    grandchild = int(marker.read_text())
    time.sleep(0.2)  # SIGKILL is delivered at once; its exit is noted by the kernel shortly after
    alive = os.path.exists(f"/proc/{grandchild}") and "zombie" not in open(f"/proc/{grandchild}/status").read().lower()
    if alive:
        os.kill(grandchild, signal.SIGKILL)  # the test leaves nothing behind either
    assert not alive


def test_a_record_script_that_times_out_is_said_to(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "run_with_timeout", lambda command, cwd, environ, timeout: (None, "step:1/9\n"))
    numbers = gpu_check.run_record(tmp_path / "record.py", Hyperparameters.from_env({"SMOKE": "1"}), Runtime(), tmp_path, timeout=5)
    assert numbers["exit_status"] is None and numbers["failed"].startswith("timed out after 5s")
    assert (tmp_path / "record_output.txt").read_text() == "step:1/9\n"
