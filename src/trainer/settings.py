"""Settings: every environment variable the trainer reads, its range, the profiles, and
the challenge's rules.

A setting is a field of `Hyperparameters`: its name in capitals is the variable, and it
carries its default (the PR #1217 record's value), its meaning and the values it may
take. `PROFILE` picks a named set of defaults (each a record's run), `SMOKE=1` shrinks
the chosen profile to the smoke run (a small model on vendored text), and every variable
that is set wins over both. Everything is checked once, at start, before any training.
Standard library only: the log reader and the pack tool use this module without torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

# The challenge's rules.
SIZE_LIMIT_BYTES = 16_000_000  # artifact + shipped code
TRAIN_SECONDS_LIMIT = 600.0  # training, GPTQ calibration included
EVAL_SECONDS_LIMIT = 600.0  # every evaluation of the artifact together


class InputError(ValueError):
    """Bad input (a setting, a file, an argument): exit status 2. The message names the
    variable or file and what was expected."""


class RunError(RuntimeError):
    """The run itself failed (non-finite loss or weights, a failed write): exit status 1."""


def missing_package(name: str) -> str:
    """The one line for a run whose Python lacks one of the packages it needs."""
    return f"error: the Python package {name!r} is not installed: pip install -r requirements.txt"


def setting(default: Any, help: str, within: str | tuple[str, ...] | None = None) -> Any:
    """A field whose environment variable is its name in capitals. `within` is the range
    of allowed numbers, written as an interval ("[0, 1)", "(0, inf)"), or the allowed
    words of a text setting."""
    return field(default=default, metadata={"help": help, "within": within})


def in_interval(value: float, interval: str) -> bool:
    low, high = (float(part) for part in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SLOT_MODES = ("window", "batch_causal", "shared")


# Named defaults: what each record's run set, on top of the field defaults above (which are
# the PR #1217 record's). docs/design.md lists every difference from each record.
PROFILES: dict[str, dict[str, Any]] = {
    "pr1217": {},
    "pr1493": dict(  # SP8192, 3-layer recurrence, parallel residuals, QK gain 5.25, SDClip GPTQ, score-first TTT
        data_path="./data/datasets/fineweb10B_sp8192", tokenizer_path="./data/tokenizers/fineweb_8192_bpe.model",
        vocab_size=8192, mlp_mult=4.0, qk_gain_init=5.25, bigram_vocab_size=0, ve_enabled=False, smear_gate=False,
        num_loops=2, parallel_residual_start=7, rope_train_seq_len=2048, warmdown_iters=0, warmdown_frac=0.72,
        gptq_reserve_ms=12000.0, train_sampler="shuffled", matrix_lr=0.022, scalar_lr=0.02, tied_embed_lr=0.03,
        embed_wd=0.085, adam_wd=0.02, muon_wd=0.095, ema_decay=0.9965, late_qat_threshold=0.0,
        matrix_clip_sigmas=12.85, embed_clip_sigmas=20.0, eval_full_last_window=False, slot_enabled=False,
        ttt_enabled=True, ttt_lr=0.005, ttt_freeze_blocks=0),
}

# The smoke run: each profile shrunk to a model that trains in two or three minutes on two
# CPU cores, on the vendored text of data/smoke/. Bounded by steps, so a seed gives the
# same score on any machine of the same kind; the hour's safety cap only stops a machine
# that is far too slow, and says so.
SMOKE_SHAPES: dict[str, Any] = dict(  # both profiles
    model_dim=128, num_heads=4, num_kv_heads=2, train_batch_tokens=8192, train_seq_len=256, grad_accum_steps=1,
    iterations=150, warmup_steps=2, max_wallclock_seconds=0.0, safety_cap_seconds=3600.0, gptq_reserve_ms=0.0,
    val_loss_every=50, train_log_every=25, val_batch_size=16384, muon_momentum_warmup_steps=100, gptq_calib_samples=4,
    ema_decay=0.95, eval_seq_len=256, eval_batch_seqs=16, ttt_enabled=True, ttt_chunk_tokens=8192, ttt_epochs=1,
    ttt_batch_seqs=8)
SMOKE_SETTINGS: dict[str, dict[str, Any]] = {
    "pr1217": dict(SMOKE_SHAPES, data_path="./data/datasets/smoke_pydoc_sp1024", num_layers=4, mlp_mult=2.0, xsa_last_n=4,
                   bigram_vocab_size=512, bigram_dim=32, ve_dim=32, ve_layers="2,3", warmdown_iters=100,
                   late_qat_min_step=100, slot_steps=4),
    "pr1493": dict(SMOKE_SHAPES, data_path="./data/datasets/smoke_pydoc_sp8192",
                   tokenizer_path="./data/tokenizers/fineweb_8192_bpe_vendored.model", num_layers=6, xsa_last_n=6,
                   loop_start=2, loop_end=3, parallel_residual_start=4, rope_train_seq_len=256,
                   train_batch_tokens=4096),  # its 8192-piece head costs as much as the blocks
}
SMOKE_EXPECTED_BPB = {"pr1217": 1.82, "pr1493": 1.83}  # each smoke run's final score for SEED=1337 (README)


@dataclass
class Hyperparameters:
    profile: str = setting("pr1217", "named defaults: each a record's run (see --help)", tuple(PROFILES))
    smoke: bool = setting(False, "the smoke run: the profile shrunk to a small model on vendored text")
    # data and run
    data_path: str = setting("./data/datasets/fineweb10B_sp1024", "folder of fineweb_train_*.bin and fineweb_val_*.bin")
    tokenizer_path: str = setting("./data/tokenizers/fineweb_1024_bpe.model", "SentencePiece model used for byte counts")
    run_id: str = setting("", "log file logs/<RUN_ID>.txt, never reused; letters, digits, . _ - (default: a UUID)")
    artifact_path: str = setting("final_model.int6.ptz", "where the quantised model is written")
    seed: int = setting(1337, "seed of weights and evaluation (data order: fixed by file names)", "[0, 4294967295]")
    # model
    vocab_size: int = setting(1024, "tokenizer vocabulary size", "[2, 65536]")
    num_layers: int = setting(11, "transformer blocks", "[1, inf)")
    model_dim: int = setting(512, "residual width", "[1, inf)")
    num_heads: int = setting(8, "query heads", "[1, inf)")
    num_kv_heads: int = setting(4, "key/value heads (grouped-query attention)", "[1, inf)")
    mlp_mult: float = setting(3.0, "MLP hidden width as a multiple of MODEL_DIM", "(0, inf)")
    qk_gain_init: float = setting(5.0, "initial per-head query gain", "(0, inf)")
    rope_dims: int = setting(16, "head dims that get rotary embedding (0: all)", "[0, inf)")
    rope_base: float = setting(10000.0, "rotary base", "(1, inf)")
    xsa_last_n: int = setting(11, "last N layers use XSA (remove the self-value component)", "[0, inf)")
    bigram_vocab_size: int = setting(2816, "BigramHash buckets (0 disables)", "[0, inf)")
    bigram_dim: int = setting(112, "BigramHash embedding width", "[1, inf)")
    ve_enabled: bool = setting(True, "value embeddings on VE_LAYERS")
    ve_dim: int = setting(128, "value-embedding table width", "[1, inf)")
    ve_layers: str = setting("9,10", "comma-separated layers that add the value embedding")
    smear_gate: bool = setting(True, "SmearGate: each position's input blends in the previous one's")
    num_loops: int = setting(0, "depth recurrence: layers LOOP_START..LOOP_END run this many more times (0: off)", "[0, inf)")
    loop_start: int = setting(3, "first layer of the looped segment", "[0, inf)")
    loop_end: int = setting(5, "last layer of the looped segment", "[0, inf)")
    enable_looping_at: float = setting(0.35, "looping starts at this fraction of training (time with a cap, else steps)", "[0, 1]")
    parallel_residual_start: int = setting(-1, "layers from this one on add attention and MLP of one input, GPT-J style (-1: none)", "[-1, inf)")
    rope_train_seq_len: int = setting(1024, "sequences longer than this get NTK-scaled RoPE (the PR #1217 record: 1024)", "[1, inf)")
    logit_softcap: float = setting(30.0, "logits = c*tanh(z/c)", "(0, inf)")
    tied_embed_init_std: float = setting(0.005, "init std of the tied embedding", "(0, inf)")
    negative_slope: float = setting(0.5, "leaky_relu slope inside the squared MLP activation", "[0, 1]")
    # schedule
    train_batch_tokens: int = setting(786_432, "tokens per optimiser step, all ranks together", "[1, inf)")
    train_seq_len: int = setting(2048, "training sequence length", "[1, inf)")
    grad_accum_steps: int = setting(0, "micro-steps per step (0: 8 // WORLD_SIZE)", "[0, inf)")
    iterations: int = setting(20000, "step limit", "[1, inf)")
    warmup_steps: int = setting(20, "compile/prime steps, then everything is reset", "[0, inf)")
    warmdown_iters: int = setting(3500, "LR decays to 0 over the last N (average-length) steps", "[0, inf)")
    warmdown_frac: float = setting(0.0, "LR decays to 0 over this last fraction of training (time with a cap, else steps; 0: WARMDOWN_ITERS)", "[0, 1)")
    max_wallclock_seconds: float = setting(600.0, "training time cap, where the LR schedule ends (0: none)", "[0, inf)")
    safety_cap_seconds: float = setting(0.0, "stop (and say so) after this long; no effect on the schedule (0: none)", "[0, inf)")
    gptq_reserve_ms: float = setting(9000.0, "part of the cap kept for GPTQ calibration", "[0, inf)")
    val_loss_every: int = setting(4000, "validate every N steps (0: only at the end)", "[0, inf)")
    train_log_every: int = setting(500, "log the train loss every N steps (0: never)", "[0, inf)")
    val_batch_size: int = setting(524_288, "tokens per validation batch, all ranks together", "[1, inf)")
    train_sampler: str = setting("coprime", "coprime: the PR #1217 record's mix of shards; shuffled: the PR #1493 record's per-rank shuffle", ("coprime", "shuffled"))
    # optimiser
    matrix_lr: float = setting(0.03, "Muon LR of the weight banks", "[0, inf)")
    early_layers: int = setting(5, "layers 0..N-1 get EARLY_LAYERS_LR_SCALE", "[0, inf)")
    early_layers_lr_scale: float = setting(1.0, "Muon LR and decay multiplier of early layers (1: the record, whose split cancels)", "[0, inf)")
    scalar_lr: float = setting(0.025, "AdamW LR of control tensors and small projections", "[0, inf)")
    tied_embed_lr: float = setting(0.035, "AdamW LR of token-like tables", "[0, inf)")
    embed_wd: float = setting(0.04, "AdamW weight decay of token-like tables", "[0, inf)")
    muon_momentum: float = setting(0.99, "Muon Nesterov momentum", "[0, 1)")
    muon_momentum_warmup_start: float = setting(0.92, "momentum at step 0", "[0, 1)")
    muon_momentum_warmup_steps: int = setting(1500, "steps to reach MUON_MOMENTUM", "[0, inf)")
    muon_backend_steps: int = setting(5, "Newton-Schulz iterations", "[1, inf)")
    muon_wd: float = setting(0.04, "decoupled weight decay of the banks", "[0, inf)")
    muon_eq_r: bool = setting(True, "row-normalise updates before Newton-Schulz (0: plain Muon)")
    beta1: float = setting(0.9, "AdamW beta1", "[0, 1)")
    beta2: float = setting(0.95, "AdamW beta2", "[0, 1)")
    adam_eps: float = setting(1e-8, "AdamW epsilon", "(0, inf)")
    adam_wd: float = setting(0.04, "AdamW weight decay of control tensors and small projections", "[0, inf)")
    grad_clip_norm: float = setting(0.3, "global gradient-norm clip (0: off)", "[0, inf)")
    ema_decay: float = setting(0.997, "EMA of the weights, applied before export", "[0, 1)")
    late_qat_threshold: float = setting(0.15, "fake-quantise small projections below this LR multiplier (0: off)", "[0, 1]")
    late_qat_min_step: int = setting(2000, "earliest step for late QAT", "[0, inf)")
    # quantisation and artifact
    gptq_calib_samples: int = setting(64, "training micro-batches for GPTQ Hessians", "[1, inf)")
    quant_clip_range: int = setting(31, "int6 grid is [-N, N] (late QAT uses the same grid)", "[1, 127]")
    gptq_fine_scales: bool = setting(False, "no scale floor, one damping, Hessian-weighted clip (finer, larger)")
    matrix_clip_sigmas: float = setting(0.0, "SDClip: int6 scales at k row standard deviations (0: the best of five quantiles)", "[0, inf)")
    embed_clip_sigmas: float = setting(0.0, "token table by GPTQ int8 at k row standard deviations (0: per-row int8 rounding)", "[0, inf)")
    # evaluation
    eval_seq_len: int = setting(2048, "evaluation window length", "[1, inf)")
    eval_stride: int = setting(64, "sliding-window stride (new tokens scored per window)", "[1, inf)")
    eval_batch_seqs: int = setting(32, "windows per evaluation batch", "[1, inf)")
    eval_full_last_window: bool = setting(True, "the last sliding window sees a whole EVAL_SEQ_LEN (0: it starts on the stride grid)")
    slot_enabled: bool = setting(True, "context-only SLOT in the sliding-window evaluation")
    slot_mode: str = setting("window", "window | batch_causal | shared (the record's: not causal)", SLOT_MODES)
    slot_steps: int = setting(8, "SLOT optimisation steps per batch", "[0, inf)")
    slot_lr: float = setting(0.005, "SLOT AdamW learning rate", "[0, inf)")
    ttt_enabled: bool = setting(False, "score-first test-time training after sliding evaluation")
    ttt_lr: float = setting(0.002, "TTT SGD learning rate (cosine over chunks)", "[0, inf)")
    ttt_epochs: int = setting(3, "TTT passes over each scored chunk", "[0, inf)")
    ttt_chunk_tokens: int = setting(32768, "TTT chunk size", "[1, inf)")
    ttt_freeze_blocks: int = setting(2, "first N blocks stay frozen during TTT", "[0, inf)")
    ttt_momentum: float = setting(0.9, "TTT SGD momentum", "[0, 1)")
    ttt_batch_seqs: int = setting(32, "TTT sequences per batch", "[1, inf)")
    ttt_grad_clip: float = setting(1.0, "TTT gradient-norm clip", "(0, inf)")
    # machinery
    compile: str = setting("auto", "torch.compile: auto (CUDA only) | 1 | 0", ("auto", "1", "0"))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Hyperparameters:
        """The profile's defaults (shrunk when SMOKE=1), then every variable that is set."""
        environ = dict(os.environ if environ is None else environ)
        chosen = {name: parse_setting(name, environ[env_of(name)]) for name in ("profile", "smoke") if env_of(name) in environ}
        base = profile_defaults(chosen.get("profile", cls.profile), chosen.get("smoke", cls.smoke))
        values = {spec.name: parse_setting(spec.name, environ[env_of(spec.name)])
                  for spec in fields(cls) if env_of(spec.name) in environ}
        hp = dataclasses.replace(base, **values)
        hp.validate()
        return hp

    def validate(self) -> None:
        """Raise InputError for the first setting that cannot work: each field's own range
        first, then the rules between settings (in order, so a later rule may divide by
        what an earlier one proved positive)."""
        for spec in fields(self):
            value, within = getattr(self, spec.name), spec.metadata["within"]
            if isinstance(within, tuple) and value not in within:
                raise InputError(f"{env_of(spec.name)}={value!r} is not allowed: one of {', '.join(within)}")
            if isinstance(within, str) and not in_interval(value, within):
                raise InputError(f"{env_of(spec.name)}={value!r} is not allowed: must lie in {within}")
        head_dim = self.model_dim // self.num_heads
        rules: list[tuple[str, bool, str]] = [
            ("run_id", self.run_id == "" or RUN_ID_PATTERN.fullmatch(self.run_id) is not None,
             "letters, digits, '.', '_' and '-' (at most 128, not starting with '.'): it names logs/<RUN_ID>.txt"),
            ("artifact_path", os.path.basename(self.artifact_path) not in ("", ".", ".."), "a file name, optionally in a folder"),
            ("num_heads", self.model_dim % self.num_heads == 0, f"must divide MODEL_DIM={self.model_dim}"),
            ("num_kv_heads", self.num_heads % self.num_kv_heads == 0, f"must divide NUM_HEADS={self.num_heads}"),
            ("rope_dims", head_dim % 2 == 0 and self.rope_dims in {0, *range(4, head_dim + 1, 2)},
             "must be 0 (all) or even in 4..the head dim"),
            ("mlp_mult", (self.mlp_mult * self.model_dim) % 1 == 0, "must give a whole hidden width"),
            ("bigram_vocab_size", self.bigram_vocab_size != 1, "must be 0 (off) or at least 2"),
            ("ve_layers", all(0 <= i < self.num_layers for i in self.value_embedding_layers),
             f"layers must lie in 0..{self.num_layers - 1}"),
            ("xsa_last_n", self.xsa_last_n <= self.num_layers, f"must be at most NUM_LAYERS={self.num_layers}"),
            ("eval_stride", self.eval_stride <= self.eval_seq_len, f"must be at most EVAL_SEQ_LEN={self.eval_seq_len}"),
            ("train_batch_tokens", self.train_batch_tokens % self.train_seq_len == 0,
             f"must be a multiple of TRAIN_SEQ_LEN={self.train_seq_len} (whole windows)"),
            ("gptq_reserve_ms", self.max_wallclock_seconds == 0 or self.gptq_reserve_ms < 1000 * self.max_wallclock_seconds,
             f"must be less than MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds:g} in ms (nothing would be left to train)"),
            ("loop_end", self.num_loops == 0 or self.loop_start <= self.loop_end < self.num_layers,
             f"must lie in LOOP_START={self.loop_start}..NUM_LAYERS-1={self.num_layers - 1} when NUM_LOOPS > 0"),
            ("warmdown_frac", self.warmdown_frac == 0 or self.warmdown_iters == 0,
             f"and WARMDOWN_ITERS={self.warmdown_iters} both set the warmdown: set the other to 0"),
            ("gptq_fine_scales", not (self.gptq_fine_scales and self.matrix_clip_sigmas),
             "only refines the quantile search: not with MATRIX_CLIP_SIGMAS > 0")]
        for name, holds, allowed in rules:
            if not holds:
                value = getattr(self, name)
                raise InputError(f"{env_of(name)}={shown(value) if isinstance(value, bool) else repr(value)} is not allowed: {allowed}")

    @property
    def value_embedding_layers(self) -> list[int]:
        try:
            return [int(part) for part in self.ve_layers.split(",") if part.strip()] if self.ve_enabled else []
        except ValueError:
            raise InputError(f"VE_LAYERS={self.ve_layers!r} is not allowed: a comma-separated list of layer numbers") from None

    @property
    def train_files(self) -> str:
        return os.path.join(glob.escape(self.data_path), "fineweb_train_*.bin")

    @property
    def val_files(self) -> str:
        return os.path.join(glob.escape(self.data_path), "fineweb_val_*.bin")


def profile_defaults(profile: str, smoke: bool) -> Hyperparameters:
    """The defaults a run starts from before its own variables."""
    if profile not in PROFILES:
        raise InputError(f"PROFILE={profile!r} is not allowed: one of {', '.join(PROFILES)}")
    return Hyperparameters(**{**PROFILES[profile], **(SMOKE_SETTINGS[profile] if smoke else {}), "profile": profile, "smoke": smoke})


def env_of(name: str) -> str:
    return name.upper()


def parse_setting(name: str, raw: str) -> Any:
    """Parse one variable by its field's type; a bad value names the variable."""
    kind = next(spec.type for spec in fields(Hyperparameters) if spec.name == name)
    text = raw.strip().lower()
    if kind == "str":
        return raw
    try:
        if kind == "bool" and text in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            return text in ("1", "true", "yes", "on")
        if kind in ("int", "float") and math.isfinite(value := (int if kind == "int" else float)(text)):
            return value
    except ValueError:
        pass
    expected = {"bool": "0 or 1", "int": "an integer", "float": "a finite number"}[kind]
    raise InputError(f"{env_of(name)}={raw!r} is not allowed: expected {expected}")


def misspelled_settings(environ: dict[str, str]) -> list[str]:
    """Warnings for variables that look like one of ours but are not (SLOT_STEP=4)."""
    ours = [env_of(spec.name) for spec in fields(Hyperparameters)]
    warnings = []
    for name in sorted(set(environ) - set(ours)):
        if close := difflib.get_close_matches(name, ours, n=1, cutoff=0.85):
            warnings.append(f"warning: {name} is not a setting (ignored); did you mean {close[0]}?")
    return warnings


def changed_settings(hp: Hyperparameters) -> str:
    """The settings that differ from the run's profile (and smoke) defaults, as VARIABLE=value."""
    base = profile_defaults(hp.profile, hp.smoke)
    return " ".join(f"{env_of(spec.name)}={getattr(hp, spec.name)}" for spec in fields(hp)
                    if getattr(hp, spec.name) != getattr(base, spec.name)) or "none"


def shown(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def settings_table() -> list[tuple[str, ...]]:
    """Per setting: the variable, its value in each profile, its range and its meaning."""
    defaults = [profile_defaults(name, False) for name in PROFILES]
    rows = []
    for spec in fields(Hyperparameters):
        within = spec.metadata["within"]
        allowed = " | ".join(within) if isinstance(within, tuple) else within or ("0 or 1" if spec.type == "bool" else "text")
        rows.append((env_of(spec.name), *(shown(getattr(hp, spec.name)) for hp in defaults), allowed, spec.metadata["help"]))
    return rows


def describe_settings() -> str:
    """The --help text: every variable with each profile's value, its range and meaning."""
    lines = [f"Environment variables ({' / '.join(PROFILES)} values, then the allowed range):"]
    for variable, *values, allowed, meaning in settings_table():
        lines.append(f"  {variable:<28} [{' / '.join(values)}] {allowed}: {meaning}")
    return "\n".join(lines)


def with_smoke_when_no_data(environ: dict[str, str]) -> dict[str, str]:
    """The environment, with SMOKE=1 added when there is nothing to train on: neither SMOKE
    nor DATA_PATH set and no shards at the profile's default path (from the working
    folder). A bare `python train_gpt.py` then runs the smoke run instead of failing."""
    profile = environ.get("PROFILE", Hyperparameters.profile)
    if "SMOKE" in environ or "DATA_PATH" in environ or profile not in PROFILES:
        return dict(environ)
    if glob.glob(profile_defaults(profile, False).train_files):
        return dict(environ)
    return {**environ, "SMOKE": "1"}
