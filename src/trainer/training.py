"""Training: the LR and momentum schedules, EMA, late QAT, the stop flags, warm-up and
the timed loop."""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from trainer.data import make_sampler
from trainer.evaluation import EvalData, evaluate_standard
from trainer.model import GPT
from trainer.optimizer import Optimizers, build_optimizers
from trainer.runtime import Progress, Runtime
from trainer.settings import Hyperparameters, RunError


def training_fraction(hp: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float | None) -> float:
    """How far training has come: by time with a wall-clock cap, else by steps."""
    return elapsed_ms / max(cap_ms, 1e-9) if cap_ms is not None else step / max(hp.iterations, 1)


def lr_multiplier(hp: Hyperparameters, step: int, elapsed_ms: float, cap_ms: float | None) -> float:
    """1, then linear to 0 at the end of training, over its last WARMDOWN_FRAC (the PR #1493
    record) or over the last WARMDOWN_ITERS steps (the PR #1217 record). With a wall-clock
    cap the WARMDOWN_ITERS warmdown is measured in time: it starts when the time left is
    less than WARMDOWN_ITERS average steps, so it ends exactly at the cap.
    """
    if hp.warmdown_frac > 0:
        fraction = training_fraction(hp, step, elapsed_ms, cap_ms)
        return 1.0 if fraction < 1 - hp.warmdown_frac else max((1 - fraction) / hp.warmdown_frac, 0.0)
    if hp.warmdown_iters <= 0:
        return 1.0
    if cap_ms is None:
        return min(max((hp.iterations - step) / hp.warmdown_iters, 0.0), 1.0)
    warmdown_ms = hp.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(cap_ms - elapsed_ms, 0.0)
    return min(remaining_ms / max(warmdown_ms, 1e-9), 1.0)


def muon_momentum_at(hp: Hyperparameters, step: int) -> float:
    fraction = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps > 0 else 1.0
    return (1 - fraction) * hp.muon_momentum_warmup_start + fraction * hp.muon_momentum

class ExponentialMovingAverage:
    """fp32 EMA of every parameter, updated each step, copied in before export."""

    def __init__(self, model: nn.Module, decay: float):
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.decay = decay

    def update(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    def copy_to_model(self) -> None:
        with torch.no_grad():
            for param, average in zip(self.params, self.shadow):
                param.copy_(average)

QAT_RAMP_STEPS, QAT_FINAL_SHARPNESS = 500, 16.0

class LateQAT:
    """Fake-quantises the small projections once the LR multiplier falls below the threshold.

    As in the reference, the step that first ran below the threshold (at or after
    LATE_QAT_MIN_STEP) switches it on for the next step; the rounding sharpness then goes
    from 1 to 16 over 500 steps. It lives in a tensor so torch.compile sees one graph.
    """

    def __init__(self, hp: Hyperparameters, model: GPT, runtime: Runtime):
        self.hp, self.model, self.runtime = hp, model, runtime
        self.sharpness = torch.ones((), device=runtime.device)
        self.start_step: int | None = None

    def switch(self, on: bool) -> None:
        for layer in self.model.qat_layers():
            layer.qat_sharpness, layer.qat_clip_range = (self.sharpness if on else None), self.hp.quant_clip_range

    def after_step(self, steps_done: int, lr_mul: float) -> None:
        """Called once `steps_done` steps have run, the last one at `lr_mul`."""
        hp = self.hp
        if self.start_step is None:
            if hp.late_qat_threshold <= 0 or lr_mul >= hp.late_qat_threshold or steps_done < hp.late_qat_min_step:
                return
            self.start_step = steps_done
            self.switch(True)
            self.runtime.log(f"late_qat:enabled step:{steps_done} scale:{lr_mul:.4f}")
        progress = min((steps_done - self.start_step) / QAT_RAMP_STEPS, 1.0)
        self.sharpness.fill_(1.0 + (QAT_FINAL_SHARPNESS - 1.0) * progress)

class StepFlags(NamedTuple):
    step: int
    loss_not_finite: bool
    cap_near: bool

class StopSignals:
    """Per-step stop flags (non-finite loss, the stop time near), agreed by all ranks and read
    one step late: on CUDA through a pinned copy and an event, so checking them never stalls
    the GPU queue, and on any device the same way, so every device stops at the same step.
    Because of that lag one more step always runs after a flag is raised; `cap_near` is
    raised early enough for that step to end before the stop time (see train)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.in_flight: tuple[int, Tensor, Any] | None = None

    def report(self, step: int, loss: Tensor, cap_near: bool) -> StepFlags | None:
        """Queue this step's flags; return the previous step's."""
        # new_full launches a fill kernel: no host-to-device copy that could stall the queue
        flags = torch.stack(((~torch.isfinite(loss.detach())).float(), loss.new_full((), float(cap_near))))
        self.runtime.all_reduce_(flags, "max")
        event = None
        if flags.is_cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flags = host
        previous, self.in_flight = self.in_flight, (step, flags, event)
        return self.read(previous) if previous is not None else None

    def drain(self) -> StepFlags | None:
        """The last step's flags, once training has ended."""
        last, self.in_flight = self.in_flight, None
        return self.read(last) if last is not None else None

    @staticmethod
    def read(pending: tuple[int, Tensor, Any]) -> StepFlags:
        step, flags, event = pending
        if event is not None:
            event.synchronize()
        not_finite, cap = flags.tolist()
        return StepFlags(step, bool(not_finite), bool(cap))

class TrainingTime(NamedTuple):
    ms: float  # training time, validation excluded
    steps: int
    stopped: str | None  # "wallclock_cap" or "safety_cap" when a cap cut training short

def train_step(train_model: Callable, optimizers: Optimizers, batches: list[tuple[Tensor, Tensor]],
               hp: Hyperparameters, runtime: Runtime) -> Tensor:
    """One optimiser step over this rank's micro-batches; returns the mean loss (a tensor)."""
    optimizers.zero_grad()
    total = torch.zeros((), device=runtime.device)
    for inputs, targets in batches:
        with runtime.autocast():
            loss = train_model(inputs, targets)
        (loss / len(batches)).backward()
        total += loss.detach()
    optimizers.step(hp.grad_clip_norm)
    return total / len(batches)

def warm_up_and_reset(hp: Hyperparameters, model: GPT, train_model: Callable, optimizers: Optimizers,
                      qat: LateQAT, runtime: Runtime) -> None:
    """Run WARMUP_STEPS real steps to compile and prime kernels, then undo them: weights and
    optimiser state return to their initial values (the caller starts a fresh sampler).

    The last warm-up step runs with late QAT on, and with NUM_LOOPS another WARMUP_STEPS
    run with the loops on (as the PR #1493 record does), so those graphs are compiled now
    rather than in the middle of the timed run.
    """
    if hp.warmup_steps <= 0:
        return
    initial_weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    initial_states = [copy.deepcopy(optimizer.state_dict()) for optimizer in optimizers.all()]
    sampler = make_sampler(hp, runtime)
    for looping in (False, True) if hp.num_loops > 0 else (False,):
        model.looping = looping
        for step in range(hp.warmup_steps):
            if step == hp.warmup_steps - 1 and hp.late_qat_threshold > 0 and not looping:
                qat.switch(True)
            train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)
            runtime.log(f"{'loop_' if looping else ''}warmup_step:{step + 1}/{hp.warmup_steps}")
        qat.switch(False)
    model.looping = False
    model.load_state_dict(initial_weights)
    for optimizer, state in zip(optimizers.all(), initial_states):
        optimizer.load_state_dict(state)
    optimizers.zero_grad()


def train(hp: Hyperparameters, model: GPT, data: EvalData, runtime: Runtime,
          clock: Callable[[], float] = time.perf_counter) -> TrainingTime:
    """The timed loop: LR schedule, EMA, late QAT, periodic validation, stop at the cap.

    The stop flags are read a step late, so a step raises "cap near" when two more average
    steps would pass the stop time: the step after it is the last, and ends within the
    cap (MAX_WALLCLOCK_SECONDS less GPTQ_RESERVE_MS, which GPTQ calibration then uses).
    Ends with the EMA weights in the model and their validation score logged. `clock`
    (seconds) is the wall clock; tests pass a fake one.
    """
    train_model = runtime.compile(model)
    validation_nll = runtime.compile(model.token_nll)
    optimizers = build_optimizers(hp, model, runtime)
    qat = LateQAT(hp, model, runtime)
    runtime.stage = "during warm-up"
    warm_up_and_reset(hp, model, train_model, optimizers, qat, runtime)
    sampler = make_sampler(hp, runtime)
    ema = ExponentialMovingAverage(model, hp.ema_decay)
    signals = StopSignals(runtime)
    cap_ms = None
    if hp.max_wallclock_seconds > 0:
        cap_ms = 1000.0 * hp.max_wallclock_seconds - hp.gptq_reserve_ms
        runtime.log(f"gptq:reserving {hp.gptq_reserve_ms:.0f}ms from training budget, effective={cap_ms:.0f}ms")
    stop_ms = min(cap_ms or math.inf, 1000.0 * hp.safety_cap_seconds or math.inf)
    progress = Progress(runtime, "training steps", hp.iterations)
    training_ms, step, stop_after, stopped, signal = 0.0, 0, None, None, None
    runtime.synchronize()
    started = clock()
    while True:
        runtime.stage = f"during training at step {step}"
        last_step = step == hp.iterations or (stop_after is not None and step >= stop_after)
        if last_step or (hp.val_loss_every > 0 and step % hp.val_loss_every == 0):
            runtime.synchronize()
            training_ms += 1000.0 * (clock() - started)
            result = evaluate_standard(model, data.val_tokens, hp.train_seq_len, hp.val_batch_size,
                                       data.token_bytes, runtime, validation_nll)
            runtime.log(f"step:{step}/{hp.iterations} val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} "
                        f"train_time:{training_ms:.0f}ms step_avg:{training_ms / max(step, 1):.2f}ms")
            started = clock()
        if last_step:
            if stop_after is not None and step < hp.iterations:
                stopped = "wallclock_cap" if stop_ms == cap_ms else "safety_cap"
                runtime.log(f"stopping_early: {stopped} train_time:{training_ms:.0f}ms step:{step}/{hp.iterations}")
            break
        elapsed_ms = training_ms + 1000.0 * (clock() - started)
        if hp.num_loops > 0 and not model.looping and training_fraction(hp, step, elapsed_ms, cap_ms) >= hp.enable_looping_at:
            model.looping = True
            encoder, decoder = model.config.layer_order(looping=True)
            runtime.log(f"layer_loop:enabled step:{step} frac:{training_fraction(hp, step, elapsed_ms, cap_ms):.3f} "
                        f"encoder:{encoder} decoder:{decoder}")
        lr_mul = lr_multiplier(hp, step, elapsed_ms, cap_ms)
        optimizers.set_schedule(lr_mul, muon_momentum_at(hp, step))
        loss = train_step(train_model, optimizers, sampler.next_step(runtime), hp, runtime)
        ema.update()
        step += 1
        qat.after_step(step, lr_mul)
        elapsed_ms = training_ms + 1000.0 * (clock() - started)
        signal = signals.report(step, loss, elapsed_ms + 2 * elapsed_ms / step > stop_ms)
        if hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0):
            mean_loss = runtime.all_reduce_(loss.detach().clone()) / runtime.world_size
            runtime.log(f"step:{step}/{hp.iterations} train_loss:{mean_loss.item():.4f} "
                        f"train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
        progress.update(step, max(min((hp.iterations - step) * elapsed_ms / step, stop_ms - elapsed_ms), 0.0) / 1000.0)
        if signal is not None and signal.cap_near and stop_after is None:
            stop_after = step
        if signal is not None and signal.loss_not_finite:
            break
    last = signal if signal is not None and signal.loss_not_finite else signals.drain()
    if last is not None and last.loss_not_finite:
        raise RunError(f"training loss is not finite at step {last.step}; stopping (lower the LRs or check the data)")
    if runtime.device.type == "cuda":
        runtime.log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                    f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    runtime.log("ema:applying EMA weights")
    ema.copy_to_model()
    qat.switch(False)
    result = evaluate_standard(model, data.val_tokens, hp.train_seq_len, hp.val_batch_size, data.token_bytes, runtime,
                               validation_nll)
    runtime.log(f"DIAGNOSTIC post_ema val_loss:{result.loss:.4f} val_bpb:{result.bpb:.4f} eval_time:{1000 * result.seconds:.0f}ms")
    return TrainingTime(training_ms, step, stopped)

