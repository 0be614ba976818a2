"""trainer.training: schedules, EMA, late QAT, loops, warm-up, the wall-clock cap, compilation."""

from __future__ import annotations

import pytest
import torch

from trainer.data import load_validation_tokens, make_sampler
from trainer.evaluation import EvalData, build_token_bytes, evaluate_sliding, evaluate_standard
from trainer.optimizer import build_optimizers
from trainer.runtime import Progress, Runtime
from trainer.settings import Hyperparameters, RunError
from trainer.training import (ExponentialMovingAverage, LateQAT, StepFlags, StopSignals, TrainingTime, lr_multiplier,
                              muon_momentum_at, train, train_step, warm_up_and_reset)
import trainer.runtime as runtime_module
import trainer.training as training_module
from conftest import tiny_hp, tiny_model


def test_wallclock_warmdown_ends_at_the_cap():
    hp = Hyperparameters.from_env({"WARMDOWN_ITERS": "100"})
    # 10 ms per step: warmdown lasts 1000 ms and ends at the 5000 ms cap
    assert lr_multiplier(hp, 100, 1000.0, 5000.0) == 1.0
    assert lr_multiplier(hp, 400, 4000.0, 5000.0) == 1.0
    assert lr_multiplier(hp, 450, 4500.0, 5000.0) == pytest.approx(0.5)
    assert lr_multiplier(hp, 500, 5000.0, 5000.0) == 0.0
    # 20 ms per step: the warmdown starts earlier (at 3000 ms)
    assert lr_multiplier(hp, 150, 3000.0, 5000.0) == pytest.approx(1.0)
    assert lr_multiplier(hp, 200, 4000.0, 5000.0) == pytest.approx(0.5)
    # WARMDOWN_ITERS=1 still warms down (over the last step's time) when there is a cap
    one_step = Hyperparameters.from_env({"WARMDOWN_ITERS": "1"})
    assert lr_multiplier(one_step, 9, 9000.0, 9500.0) == pytest.approx(0.5)
    # after the first step: its time is the average (4 x 1000 ms of warmdown, 2000 ms left)
    assert lr_multiplier(Hyperparameters.from_env({"WARMDOWN_ITERS": "4"}), 1, 1000.0, 3000.0) == pytest.approx(0.5)


def test_step_schedule_without_a_cap():
    hp = Hyperparameters.from_env({"WARMDOWN_ITERS": "100", "ITERATIONS": "1000"})
    assert [lr_multiplier(hp, s, 0.0, None) for s in (0, 900, 950, 999, 1000)] == [1.0, 1.0, 0.5, 0.01, 0.0]
    assert lr_multiplier(Hyperparameters.from_env({"WARMDOWN_ITERS": "0"}), 19999, 0.0, None) == 1.0


def test_the_fraction_warmdown_of_pr1493():
    """Flat for the first 28% of training, then linear to 0: by time with a cap, else by steps."""
    hp = Hyperparameters.from_env({"PROFILE": "pr1493"})
    assert hp.warmdown_frac == 0.72 and hp.warmdown_iters == 0
    cap = 588_000.0
    assert [lr_multiplier(hp, 0, f * cap, cap) for f in (0.0, 0.27, 0.28, 0.64, 1.0)] == pytest.approx([1, 1, 1, 0.5, 0])
    assert lr_multiplier(hp, 0, 0.5 * cap, cap) == pytest.approx(0.5 / 0.72)
    steps = Hyperparameters.from_env({"PROFILE": "pr1493", "ITERATIONS": "1000", "MAX_WALLCLOCK_SECONDS": "0"})
    assert [lr_multiplier(steps, s, 123.0, None) for s in (0, 280, 640, 1000)] == pytest.approx([1, 1, 0.5, 0])


def test_momentum_warms_up_linearly():
    hp = Hyperparameters.from_env({})
    assert muon_momentum_at(hp, 0) == 0.92
    assert muon_momentum_at(hp, 750) == pytest.approx(0.955)
    assert muon_momentum_at(hp, 1500) == muon_momentum_at(hp, 5000) == 0.99
    no_warmup = Hyperparameters.from_env({"MUON_MOMENTUM_WARMUP_STEPS": "0"})
    assert muon_momentum_at(no_warmup, 0) == 0.99
    one_step = Hyperparameters.from_env({"MUON_MOMENTUM_WARMUP_STEPS": "1"})
    assert muon_momentum_at(one_step, 0) == 0.92 and muon_momentum_at(one_step, 1) == 0.99


def test_ema_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model, 0.9)
    expected = [p.detach().double().clone() for p in model.parameters()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach().double() for e, p in zip(expected, model.parameters())]
    ema.copy_to_model()
    assert all(torch.allclose(p.double(), e, atol=1e-6) for p, e in zip(model.parameters(), expected))


def test_late_qat_switches_on_below_the_threshold_and_ramps_its_sharpness():
    hp = tiny_hp(LATE_QAT_THRESHOLD="0.15", LATE_QAT_MIN_STEP="100")
    model = tiny_model(hp)
    qat = LateQAT(hp, model, Runtime())
    qat.after_step(50, 0.1)  # below the threshold, but before the earliest step
    qat.after_step(120, 0.2)  # late enough, but above the threshold
    assert qat.start_step is None and all(layer.qat_sharpness is None for layer in model.qat_layers())
    qat.after_step(121, 0.14)
    assert qat.start_step == 121 and all(layer.qat_sharpness is qat.sharpness for layer in model.qat_layers())
    sharpness = {}
    for steps_done, lr_mul in ((122, 0.13), (371, 0.05), (621, 0.0), (900, 0.0)):
        qat.after_step(steps_done, lr_mul)
        sharpness[steps_done] = float(qat.sharpness)
    assert sharpness == pytest.approx({122: 1 + 15 / 500, 371: 8.5, 621: 16.0, 900: 16.0})
    qat.switch(False)
    assert all(layer.qat_sharpness is None for layer in model.qat_layers())


def test_late_qat_needs_an_lr_strictly_below_the_threshold_and_starts_at_its_earliest_step():
    hp = tiny_hp(LATE_QAT_THRESHOLD="0.15", LATE_QAT_MIN_STEP="100")
    qat = LateQAT(hp, tiny_model(hp), Runtime())
    qat.after_step(100, 0.15)  # at the threshold: not below it
    assert qat.start_step is None
    qat.after_step(100, 0.1499)  # LATE_QAT_MIN_STEP itself is early enough
    assert qat.start_step == 100


def test_train_step_averages_its_micro_batches_from_fresh_gradients():
    hp = tiny_hp()
    model, runtime = tiny_model(hp), Runtime()
    optimizers = build_optimizers(hp, model, runtime)
    tokens = torch.randint(0, 1024, (2, 2, 33), generator=torch.Generator().manual_seed(3))
    batches = [(rows[:, :-1], rows[:, 1:]) for rows in tokens]
    losses = [model(x, y) for x, y in batches]
    expected = torch.autograd.grad((losses[0] + losses[1]) / 2, list(model.parameters()), allow_unused=True)
    seen = []
    optimizers.step = lambda clip_norm: seen.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
    for _ in range(2):  # the second step must not add to the first one's gradients
        loss = train_step(model, optimizers, batches, hp, runtime)
        assert float(loss) == pytest.approx(float(sum(losses).detach()) / 2, rel=1e-6)
    for grads in seen:
        for got, want in zip(grads, expected):
            assert (got is None and want is None) or torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_warm_up_leaves_weights_optimiser_state_and_data_order_as_before(smoke_corpus):
    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", WARMUP_STEPS="3")
    model, runtime = tiny_model(hp), Runtime()
    optimizers = build_optimizers(hp, model, runtime)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first_batches = make_sampler(hp, runtime).next_step(runtime)
    qat = LateQAT(hp, model, runtime)
    warm_up_and_reset(hp, model, model, optimizers, qat, runtime)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(optimizer.state_dict()["state"] == {} for optimizer in optimizers.all())
    assert all(layer.qat_sharpness is None for layer in model.qat_layers())
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first_batches, make_sampler(hp, runtime).next_step(runtime)))


@pytest.mark.parametrize("warmup_steps, threshold, expected", [
    ("3", "0.6", [False, False, True]), ("1", "0.6", [True]), ("3", "0", [False] * 3), ("0", "0.6", [])])
def test_warm_up_runs_its_steps_with_late_qat_only_in_the_last(smoke_corpus, monkeypatch, warmup_steps, threshold, expected):
    """The last warm-up step compiles the late-QAT graph, so the timed run never does."""
    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", WARMUP_STEPS=warmup_steps,
                 LATE_QAT_THRESHOLD=threshold)
    model, runtime = tiny_model(hp), Runtime()
    seen = []
    monkeypatch.setattr(training_module, "train_step", lambda *args: seen.append(model.bigram.proj.qat_sharpness is not None))
    warm_up_and_reset(hp, model, model, build_optimizers(hp, model, runtime),
                              LateQAT(hp, model, runtime), runtime)
    assert seen == expected and model.bigram.proj.qat_sharpness is None


class FakeClock:
    """Seconds that pass only when the test says so: each training step takes 1 s."""

    def __init__(self):
        self.now = 1000.0  # not 0: the loop must use differences of the clock, never its value

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def timed_run(smoke_corpus, tokenizer, monkeypatch):
    """Train with a fake clock; returns the settings, the model, what each timed step saw,
    the initial weights, the log and train's result. learn=False skips the steps'
    arithmetic (the loss of step k, counting warm-up, is loss_at(k)), for the loop alone."""

    def run(learn: bool = True, loss_at=lambda step: 2.5, **settings):
        hp = tiny_hp(**{"DATA_PATH": str(smoke_corpus), "TRAIN_BATCH_TOKENS": "512", "VAL_LOSS_EVERY": "0",
                        "TRAIN_LOG_EVERY": "1", "GPTQ_RESERVE_MS": "0", **settings})
        model, runtime, clock, steps = tiny_model(hp), Runtime(), FakeClock(), []
        real_step = train_step

        def timed_step(train_model, optimizers, batches, hp, runtime):
            loss = real_step(train_model, optimizers, batches, hp, runtime) if learn else torch.tensor(loss_at(len(steps) + 1))
            steps.append({"lr": optimizers.muon.param_groups[0]["lr"], "momentum": optimizers.muon.param_groups[0]["momentum"],
                          "qat": model.bigram is not None and model.bigram.proj.qat_sharpness is not None,
                          "looping": model.looping, "inputs": batches[0][0].clone(),
                          "weights": [p.detach().double().clone() for p in model.parameters()]})
            clock.now += 1.0
            return loss

        real_evaluation = evaluate_standard

        def timed_evaluation(*args, **kwargs):  # validation takes time too, which is not training time
            clock.now += 0.5
            return real_evaluation(*args, **kwargs)

        monkeypatch.setattr(training_module, "train_step", timed_step)
        monkeypatch.setattr(training_module, "evaluate_standard", timed_evaluation)
        data = EvalData(load_validation_tokens(hp.val_files, 64, 1024, runtime)[:2049],
                                build_token_bytes(tokenizer, 1024, runtime.device))
        initial = [p.detach().double().clone() for p in model.parameters()]
        log: list[str] = []
        monkeypatch.setattr(Runtime, "log", lambda self, message, console=True: log.append(message))
        result = train(hp, model, data, runtime, clock=clock)
        return hp, model, steps[hp.warmup_steps * (2 if hp.num_loops else 1):], initial, log, result  # the timed steps

    return run


def test_the_wallclock_cap_shapes_the_schedule_and_stops_training(timed_run):
    hp, _, steps, _, log, result = timed_run(MAX_WALLCLOCK_SECONDS="10", WARMDOWN_ITERS="4", ITERATIONS="100", WARMUP_STEPS="0",
                                             MUON_MOMENTUM_WARMUP_STEPS="4")
    assert len(steps) == 10  # 1 s per step, a 10 s cap
    assert [s["lr"] / hp.matrix_lr for s in steps] == pytest.approx([1] * 7 + [0.75, 0.5, 0.25])
    assert [s["momentum"] for s in steps[:5]] == pytest.approx([0.92, 0.937, 0.955, 0.972, 0.99], abs=1e-3)
    assert "stopping_early: wallclock_cap train_time:10000ms step:10/100" in log
    assert result == TrainingTime(10_000.0, 10, "wallclock_cap") and "ema:applying EMA weights" in log


def test_the_safety_cap_stops_without_shaping_the_schedule(timed_run):
    hp, _, steps, _, log, _ = timed_run(SAFETY_CAP_SECONDS="6", WARMDOWN_ITERS="4", ITERATIONS="8", WARMUP_STEPS="0")
    assert [s["lr"] / hp.matrix_lr for s in steps] == pytest.approx([1, 1, 1, 1, 1, 0.75])  # the step schedule
    assert "stopping_early: safety_cap train_time:6000ms step:6/8" in log


@pytest.mark.parametrize("cap, reserve_ms, steps_run", [("10", "0", 10), ("10", "2000", 8), ("10", "2500", 7), ("7.5", "0", 7)])
def test_the_step_after_the_late_flag_still_ends_within_the_cap(timed_run, cap, reserve_ms, steps_run):
    """The stop flags are read a step late, so one more step runs after the step that saw
    the cap near: it is raised two average steps ahead, and that last step ends in time."""
    hp, _, steps, _, log, _ = timed_run(False, MAX_WALLCLOCK_SECONDS=cap, GPTQ_RESERVE_MS=reserve_ms, ITERATIONS="100",
                                        WARMUP_STEPS="0", WARMDOWN_ITERS="3")
    effective = 1000 * float(cap) - float(reserve_ms)
    assert len(steps) == steps_run and steps_run * 1000 <= effective < (steps_run + 1) * 1000
    assert f"stopping_early: wallclock_cap train_time:{steps_run * 1000}ms step:{steps_run}/100" in log
    assert steps[-1]["lr"] > 0  # the last step still learns: the warmdown ends at the cap


def test_a_cap_shorter_than_two_steps_runs_two(timed_run):
    """The only overshoot left: with the flags a step late, at least two steps run."""
    _, _, steps, _, log, _ = timed_run(False, MAX_WALLCLOCK_SECONDS="1", GPTQ_RESERVE_MS="500", ITERATIONS="5",
                                       WARMUP_STEPS="0")
    assert len(steps) == 2 and any(m.endswith("effective=500ms") for m in log)
    assert "stopping_early: wallclock_cap train_time:2000ms step:2/5" in log


def test_validation_runs_every_n_steps_and_its_time_is_not_training_time(timed_run):
    _, _, _, _, log, _ = timed_run(False, ITERATIONS="3", WARMUP_STEPS="0", VAL_LOSS_EVERY="1")
    validations = [m for m in log if m.startswith("step:") and " val_loss:" in m]
    assert [m.split()[0] for m in validations] == ["step:0/3", "step:1/3", "step:2/3", "step:3/3"]
    assert [m.split("train_time:")[1].split()[0] for m in validations] == ["0ms", "1000ms", "2000ms", "3000ms"]


@pytest.mark.parametrize("every, iterations, logged", [("4", "12", [*range(1, 11), 12]), ("1", "12", [*range(1, 13)]),
                                                       ("0", "11", [])])
def test_train_loss_is_logged_for_the_first_10_steps_then_every_n(timed_run, every, iterations, logged):
    _, _, _, _, log, _ = timed_run(False, ITERATIONS=iterations, WARMUP_STEPS="0", TRAIN_LOG_EVERY=every)
    assert [int(m.split("/")[0][5:]) for m in log if " train_loss:" in m] == logged


def test_step_bounded_training_ignores_the_clock(timed_run):
    _, _, steps, _, log, _ = timed_run(ITERATIONS="5", WARMUP_STEPS="0")
    assert len(steps) == 5 and not any(m.startswith("stopping_early") for m in log)


def test_a_cap_first_seen_at_the_last_step_is_not_an_early_stop(timed_run):
    # the 5 s cap is reached at step 5 = ITERATIONS (on CUDA it is read a step late): the run was not cut short
    _, _, steps, _, log, _ = timed_run(False, MAX_WALLCLOCK_SECONDS="5", ITERATIONS="5", WARMUP_STEPS="0")
    assert len(steps) == 5 and not any(m.startswith("stopping_early") for m in log)


@pytest.mark.parametrize("settings, expected", [({"ITERATIONS": "5"}, [4, 3, 2, 1, 0]),  # steps left at 1 s a step
                                                ({"ITERATIONS": "100", "MAX_WALLCLOCK_SECONDS": "3"}, [2, 1, 0])])
def test_the_progress_estimate_is_the_time_left_to_the_nearer_end(timed_run, monkeypatch, settings, expected):
    estimates = []
    monkeypatch.setattr(Progress, "update", lambda self, done, seconds_left=None: estimates.append(seconds_left))
    timed_run(False, WARMUP_STEPS="0", **settings)
    assert estimates == pytest.approx(expected)


def test_the_exported_weights_are_the_ema_of_the_steps(timed_run):
    hp, model, steps, initial, _, _ = timed_run(ITERATIONS="4", WARMUP_STEPS="2", EMA_DECAY="0.7")
    expected = initial
    for step in steps:
        expected = [0.7 * e + 0.3 * w for e, w in zip(expected, step["weights"])]
    assert all(torch.allclose(p.double(), e, atol=1e-6) for p, e in zip(model.parameters(), expected))
    assert not all(torch.allclose(p.double(), w, atol=1e-6) for p, w in zip(model.parameters(), steps[-1]["weights"]))


def test_timed_steps_see_the_data_from_its_start_after_warm_up(timed_run, smoke_corpus):
    hp, _, steps, _, _, _ = timed_run(ITERATIONS="3", WARMUP_STEPS="2")
    fresh = make_sampler(hp, Runtime())
    assert all(torch.equal(step["inputs"], fresh.next_step(Runtime())[0][0]) for step in steps)


def test_late_qat_starts_the_step_after_the_lr_falls_below_the_threshold(timed_run):
    _, model, steps, _, log, _ = timed_run(ITERATIONS="8", WARMDOWN_ITERS="4", WARMUP_STEPS="0", LATE_QAT_THRESHOLD="0.6",
                                           LATE_QAT_MIN_STEP="0")
    # step index 6 runs at 0.5 (< 0.6); the reference switches QAT on for the following step
    assert [s["qat"] for s in steps] == [False] * 7 + [True]
    assert "late_qat:enabled step:7 scale:0.5000" in log
    assert all(layer.qat_sharpness is None for layer in model.qat_layers())  # evaluated and exported without it


def test_a_non_finite_loss_stops_with_its_step(timed_run):
    with pytest.raises(RunError, match=r"training loss is not finite at step \d+"):
        timed_run(ITERATIONS="30", WARMUP_STEPS="0", TIED_EMBED_LR="1e30", SCALAR_LR="1e30", GRAD_CLIP_NORM="0")


@pytest.mark.parametrize("iterations", ["30", "3"], ids=["mid_run", "last_step"])
def test_the_first_non_finite_step_is_named_even_at_the_last_step(timed_run, iterations):
    """Step 3's loss is NaN: its flags are read at step 4, or drained when step 3 was the last."""
    with pytest.raises(RunError) as caught:
        timed_run(False, loss_at=lambda step: 2.5 if step < 3 else float("nan"), ITERATIONS=iterations, WARMUP_STEPS="0")
    assert str(caught.value) == "training loss is not finite at step 3; stopping (lower the LRs or check the data)"


def test_every_timed_path_compiles_once_and_matches_eager(smoke_corpus, tokenizer):
    """Training (with and without late QAT), validation and sliding evaluation with SLOT,
    including its short last batch, each compile one graph, all before the timed steps
    that use them run again; the compiled run's losses are the eager run's."""
    import torch._dynamo

    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", ITERATIONS="6", WARMUP_STEPS="2",
                 WARMDOWN_ITERS="6", VAL_LOSS_EVERY="3", LATE_QAT_THRESHOLD="0.6", LATE_QAT_MIN_STEP="0",
                 MAX_WALLCLOCK_SECONDS="0", EVAL_BATCH_SEQS="8", SLOT_STEPS="2", TRAIN_LOG_EVERY="1", VAL_BATCH_SIZE="640")
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        runtime = Runtime(compile_enabled=compiled, compile_backend="eager")
        data = EvalData(load_validation_tokens(hp.val_files, 64, 1024, runtime)[:1000],
                                build_token_bytes(tokenizer, 1024, runtime.device))
        log: list[str] = []
        runtime.log = lambda message, console=True: log.append(message)
        model = tiny_model(hp)
        train(hp, model, data, runtime)
        after_training = dict(torch._dynamo.utils.counters["stats"])
        for _ in range(2):
            evaluate_sliding(model, data, hp, runtime)  # 60 windows: the last batch is short
        losses[compiled] = [float(m.split("train_loss:")[1].split()[0]) for m in log if "train_loss:" in m]
        if compiled:
            assert after_training["unique_graphs"] == 3  # train, train with QAT, validation
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 5  # + hidden states, SLOT objective
            assert torch._dynamo.utils.counters["stats"]["calls_captured"] > 0
    assert len(losses[True]) == 6 and losses[True] == pytest.approx(losses[False], abs=2e-4)


@pytest.mark.parametrize("call, stage", [(1, "during warm-up"), (3, "during training at step 1")])
def test_an_interrupt_leaves_the_stage_it_came_in(smoke_corpus, monkeypatch, call, stage):
    """The stage run_cli names when a run is interrupted: warm-up, then the timed steps."""
    calls = []

    def interrupted(*args):  # call 1 is the warm-up step; call 3 the second timed step, after step 1
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return torch.tensor(2.5)

    hp = tiny_hp(DATA_PATH=str(smoke_corpus), ITERATIONS="5", WARMUP_STEPS="1", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="0")
    runtime = Runtime()
    monkeypatch.setattr(training_module, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(hp, tiny_model(hp), None, runtime)
    assert runtime.stage == stage


def test_late_qat_uses_the_quant_clip_range():
    hp = tiny_hp(QUANT_CLIP_RANGE="15", LATE_QAT_THRESHOLD="0.5")
    model = tiny_model(hp)
    qat = LateQAT(hp, model, Runtime())
    qat.switch(True)
    assert {(layer.qat_clip_range, layer.qat_sharpness is qat.sharpness) for layer in model.qat_layers()} == {(15, True)}


def test_loops_switch_on_at_their_fraction_and_warm_up_first(timed_run):
    """PR #1493: looping starts at 35% of training (here 20 steps) and stays; the warm-up
    runs WARMUP_STEPS more with the loops on, then resets them."""
    hp, model, steps, _, log, _ = timed_run(False, PROFILE="pr1493", NUM_LAYERS="4", LOOP_START="1", LOOP_END="2",
                                            PARALLEL_RESIDUAL_START="3", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0",
                                            VOCAB_SIZE="1024", ITERATIONS="20", WARMUP_STEPS="2", MAX_WALLCLOCK_SECONDS="0")
    warmup = [line for line in log if "warmup_step" in line]
    assert warmup == ["warmup_step:1/2", "warmup_step:2/2", "loop_warmup_step:1/2", "loop_warmup_step:2/2"]
    assert [s["looping"] for s in steps] == [False] * 7 + [True] * 13  # step 7 of 20 is the first at >= 0.35
    assert "layer_loop:enabled step:7 frac:0.350 encoder:[0, 1, 2, 1] decoder:[2, 1, 2, 3]" in log
    assert model.looping


class PeerFlags:
    """torch.distributed as rank 0 of 2 sees it: the other rank's stop flags are `peer`."""
    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, peer: list[float]):
        self.peer, self.ops = torch.tensor(peer), []

    def all_reduce(self, tensor, op):
        self.ops.append(op)
        tensor.copy_(torch.maximum(tensor, self.peer) if op == torch.distributed.ReduceOp.MAX else tensor + self.peer)


def test_a_flag_raised_on_either_rank_stops_both_a_step_late_and_the_last_steps_flags_are_drained(monkeypatch):
    fake = PeerFlags([0.0, 1.0])  # the other rank sees the stop time near
    monkeypatch.setattr(runtime_module, "dist", fake)
    signals = StopSignals(Runtime(rank=0, world_size=2))
    assert signals.drain() is None  # no step yet
    assert signals.report(1, torch.tensor(2.5), False) is None
    assert signals.report(2, torch.tensor(float("nan")), False) == StepFlags(1, False, True)
    assert signals.drain() == StepFlags(2, True, True) and signals.drain() is None
    assert fake.ops == [torch.distributed.ReduceOp.MAX] * 2


def test_the_safety_cap_is_in_seconds(timed_run):
    """1 s steps and a 6.999 s safety cap: step 5 sees the stop two steps ahead, so 6 run."""
    _, _, steps, _, log, _ = timed_run(False, SAFETY_CAP_SECONDS="6.999", ITERATIONS="20", WARMUP_STEPS="0")
    assert len(steps) == 6 and "stopping_early: safety_cap train_time:6000ms step:6/20" in log


def test_validation_and_loss_lines_give_the_average_step_time(timed_run):
    _, _, _, _, log, result = timed_run(False, ITERATIONS="3", WARMUP_STEPS="0", VAL_LOSS_EVERY="1")
    averages = [m.split("step_avg:")[1] for m in log if m.startswith("step:") and " val_loss:" in m]
    assert averages == ["0.00ms", "1000.00ms", "1000.00ms", "1000.00ms"]
    assert "step:2/3 train_loss:2.5000 train_time:2000ms step_avg:1000.00ms" in log
    assert result == TrainingTime(3000.0, 3, None)


def test_training_progress_is_printed_with_its_label(timed_run, monkeypatch, capsys):
    monkeypatch.setattr(Progress.__init__, "__defaults__", (0.0, None))  # a line after every step
    timed_run(False, ITERATIONS="3", WARMUP_STEPS="0")
    lines = [line.split(",")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  training steps")]
    assert lines == ["  training steps: 1/3", "  training steps: 2/3", "  training steps: 3/3"]


def test_a_model_without_loops_never_loops(timed_run):
    _, model, steps, _, log, _ = timed_run(False, ITERATIONS="6", WARMUP_STEPS="0", ENABLE_LOOPING_AT="0")
    assert not any(step["looping"] for step in steps) and not model.looping
    assert not any(line.startswith("layer_loop") for line in log)


def test_one_loop_switches_on_by_time_under_a_cap(timed_run):
    """With a 9 s cap and 1 s steps, 35% of training is 3.15 s, whatever ITERATIONS says."""
    _, _, steps, _, log, _ = timed_run(False, PROFILE="pr1493", NUM_LAYERS="4", LOOP_START="1", LOOP_END="2", NUM_LOOPS="1",
                                       PARALLEL_RESIDUAL_START="3", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0", VOCAB_SIZE="1024",
                                       ITERATIONS="1000", WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="9", GPTQ_RESERVE_MS="0")
    assert [line for line in log if "warmup_step" in line] == ["warmup_step:1/1", "loop_warmup_step:1/1"]
    assert [s["looping"] for s in steps] == [False] * 4 + [True] * 5  # 4 s of 9 is the first past 35%
    assert "layer_loop:enabled step:4 frac:0.444 encoder:[0, 1, 2] decoder:[1, 2, 3]" in log


def test_a_looped_model_warms_up_again_with_its_loops_on(smoke_corpus, monkeypatch):
    hp = tiny_hp(DATA_PATH=str(smoke_corpus), TRAIN_BATCH_TOKENS="512", WARMUP_STEPS="2", PROFILE="pr1493", NUM_LAYERS="4",
                 LOOP_START="1", LOOP_END="2", NUM_LOOPS="1", XSA_LAST_N="4", BIGRAM_VOCAB_SIZE="0", VOCAB_SIZE="1024")
    model, runtime = tiny_model(hp), Runtime()
    seen = []
    monkeypatch.setattr(training_module, "train_step", lambda *args: seen.append(model.looping))
    warm_up_and_reset(hp, model, model, build_optimizers(hp, model, runtime), LateQAT(hp, model, runtime), runtime)
    assert seen == [False, False, True, True] and model.looping is False
