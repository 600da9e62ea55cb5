import copy
import dataclasses
import shutil

import pytest
import torch
from factories import tiny_llama

from compress.pruning.archspec import Shape, resolve
from compress.pruning.planner import keep_all_plan, select
from compress.pruning.scoring import random_scores
from compress.pruning.surgery import apply_plan
from distill import DistillConfig, DistillError, distill, latest_checkpoint, logit_distillation_loss
from distill.trainer import _optimizers


def _pair(seed=0):
    # A larger init scale gives the random teacher peaked next-token distributions worth distilling.
    teacher = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, seed=seed, initializer_range=0.2)
    spec = resolve(teacher)
    plan = keep_all_plan(spec, teacher.config)
    shape = Shape(64, 64, 2, 2, 2)
    plan = type(plan)(**{**plan.__dict__, "shape": shape, "kept": select(spec, random_scores(spec, 0), shape)})
    return teacher, apply_plan(teacher, spec, plan)


def _logit_inputs(seed, positions, vocab, width=16, teacher_width=24):
    """Student hidden states and head (requiring gradients), teacher hidden states and head, and targets."""
    torch.manual_seed(seed)
    return (torch.randn(positions, width, requires_grad=True), torch.randn(vocab, width, requires_grad=True),
            torch.randn(positions, teacher_width), torch.randn(vocab, teacher_width), torch.randint(0, vocab, (positions,)))


def test_chunked_kl_equals_unchunked_in_value_and_gradient():
    hidden, head, t_hidden, t_head, targets = _logit_inputs(0, 37, 50)
    values, grads = [], []
    for chunk in (5, 1000):
        loss = logit_distillation_loss(hidden, head, t_hidden, t_head, targets, temperature=2.0, ce_weight=0.5, chunk=chunk)
        values.append(loss.detach())
        grads.append(torch.autograd.grad(loss, (hidden, head)))
    assert torch.allclose(values[0], values[1], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[0], grads[1], strict=True))


@pytest.mark.parametrize("temperature, kl_weight, ce_weight, cap", [
    (1.0, 1.0, 0.0, None), (2.0, 1.0, 0.5, None), (1.0, 0.5, 0.5, None), (1.0, 0.0, 1.0, 30.0), (1.0, 1.0, 0.0, 5.0)])
def test_fused_loss_equals_autograd_in_value_and_gradient(temperature, kl_weight, ce_weight, cap):
    hidden, head, t_hidden, t_head, targets = _logit_inputs(1, 150, 70)  # more positions than one fused slice (64)
    results = []
    for fused in (False, True):
        loss = logit_distillation_loss(hidden, head, t_hidden, t_head, targets, temperature=temperature,
                                       kl_weight=kl_weight, ce_weight=ce_weight, chunk=100, student_cap=cap,
                                       teacher_cap=cap, fused=fused)
        results.append((loss.detach(), torch.autograd.grad(3 * loss, (hidden, head))))
    (plain, plain_grads), (fused_value, fused_grads) = results
    assert torch.allclose(plain, fused_value, rtol=1e-5)
    for a, b in zip(plain_grads, fused_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_loss_under_bf16_autocast_matches_autograd_to_bf16_precision():
    hidden, head, t_hidden, t_head, targets = _logit_inputs(2, 80, 90, width=32, teacher_width=32)
    results = []
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = logit_distillation_loss(hidden.bfloat16(), head, t_hidden.bfloat16(), t_head, targets,
                                           ce_weight=0.5, fused=fused)
        results.append((loss.detach(), torch.autograd.grad(loss, (hidden, head))))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-3)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert (a - b).abs().max() <= 0.02 * a.abs().max()
        assert b.dtype == a.dtype


def test_fused_loss_without_gradients_gives_the_same_value():
    hidden, head = torch.randn(20, 8), torch.randn(30, 8)
    t_hidden, t_head = torch.randn(20, 8), torch.randn(30, 8)
    with torch.no_grad():
        values = [logit_distillation_loss(hidden, head, t_hidden, t_head, fused=fused) for fused in (False, True)]
    assert torch.allclose(values[0], values[1], rtol=1e-5)


def test_kl_is_zero_when_student_equals_teacher():
    hidden, head = torch.randn(10, 8), torch.randn(30, 8)
    assert logit_distillation_loss(hidden, head, hidden, head).abs() < 1e-5


def test_schedules():
    wsd = DistillConfig(steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.01)
    lrs = [wsd.lr_at(s, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in lrs[10:80]) and lrs[99] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:], strict=False))
    cosine = DistillConfig(steps=100, lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.0)
    assert cosine.lr_at(0, 100) == pytest.approx(1.0) and cosine.lr_at(50, 100) == pytest.approx(0.5)
    assert DistillConfig(tokens=1000, batch_size=2, grad_accum=2).total_steps(seq_len=10, world_size=2) == 13
    # A run shorter than its warmup (ten steps of a small budget) warms up over a quarter of it, then holds and
    # decays to the floor, rather than ending at the peak.
    short = [DistillConfig(lr=1.0, warmup_steps=10).lr_at(s, 10) for s in range(10)]
    assert short[:2] == [0.5, 1.0] and short[2:8] == [1.0] * 6 and short[9] == pytest.approx(0.01)


def test_muon_gets_only_hidden_matrices():
    _, student = _pair()
    adamw, muon = _optimizers(student, None, DistillConfig(optimizer="muon"))
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert id(student.model.embed_tokens.weight) not in muon_params
    assert id(student.model.layers[0].mlp.down_proj.weight) in muon_params
    adamw_params = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_params & adamw_params
    assert len(muon_params | adamw_params) == len(list(student.parameters()))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_distillation_lowers_the_kl(optimizer):
    teacher, student = _pair()
    ids = torch.randint(3, 250, (64, 16))
    config = DistillConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=2, optimizer=optimizer, eval_every=0)
    result = distill(student, teacher, ids, config, progress=False)
    first = sum(r["loss"] for r in result.history[:5]) / 5
    last = sum(r["loss"] for r in result.history[-5:]) / 5
    assert last < 0.7 * first
    assert result.tokens == 40 * 8 * 16 and result.tokens_per_second > 0


def test_kl_only_ignores_labels_and_ce_mix_uses_them():
    teacher, student = _pair()
    ids = torch.randint(3, 250, (8, 12))
    plain = distill(student, teacher, ids, DistillConfig(steps=1, batch_size=8, lr=0.0, warmup_steps=0), progress=False)
    _, student2 = _pair()
    mixed = distill(student2, teacher, ids, DistillConfig(steps=1, batch_size=8, lr=0.0, warmup_steps=0, ce_weight=1.0), progress=False)
    assert mixed.final_loss > plain.final_loss + 1.0  # cross-entropy on random tokens is large


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher, student = _pair()
    ids = torch.randint(3, 250, (32, 12))
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 3 else output

    student.model.norm.register_forward_hook(poison)
    config = DistillConfig(steps=10, batch_size=4, checkpoint_every=2, eval_every=0)
    with pytest.raises(DistillError, match="became nan at step 3.*step-0000002"):
        distill(student, teacher, ids, config, checkpoint_dir=tmp_path, progress=False)
    good = latest_checkpoint(tmp_path)
    assert good is not None and good.name == "step-0000002"


def test_trainer_loss_does_not_depend_on_the_logits_memory_bound():
    teacher, student = _pair()
    ids = torch.randint(3, 250, (4, 12))
    losses = []
    for elements in (2**28, 256 * 5):  # one chunk, or chunks of 5 positions with recomputation
        _, fresh = _pair()
        config = DistillConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, kl_chunk_elements=elements, bf16=False)
        losses.append([r["loss"] for r in distill(fresh, teacher, ids, config, progress=False).history])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_trainer_step_is_the_same_math_fused_or_not_eager_or_sdpa():
    teacher, _ = _pair()
    ids = torch.randint(3, 250, (8, 12))
    histories = {}
    for fused, attention in ((False, "sdpa"), (True, "eager"), (True, "auto")):
        _, student = _pair()
        student.set_attn_implementation("sdpa")
        config = DistillConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, ce_weight=0.5, bf16=False,
                               fused_loss=fused, attention=attention, eval_every=0)
        histories[fused, attention] = [r["loss"] for r in distill(student, teacher, ids, config, progress=False).history]
        assert student.config._attn_implementation == "sdpa"  # the model's own attention comes back
    reference = histories[False, "sdpa"]
    assert histories[True, "eager"] == pytest.approx(reference, rel=1e-4)
    assert histories[True, "auto"] == pytest.approx(reference, rel=1e-4)


def test_auto_attention_is_eager_only_for_short_sequences_on_cpu():
    config = DistillConfig()
    assert config.attention_for("cpu", 256) == "eager"
    assert config.attention_for("cpu", 4096) is None
    assert config.attention_for("cuda", 256) is None
    assert DistillConfig(attention="model").attention_for("cpu", 256) is None
    with pytest.raises(DistillError, match="attention 'flash'"):
        DistillConfig(attention="flash")


def test_teacher_linears_cast_once_give_bit_identical_outputs_and_come_back():
    from distill.speed import low_precision_linears

    teacher, _ = _pair()
    ids = torch.randint(3, 250, (2, 10))
    before = {name: p for name, p in teacher.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = teacher(input_ids=ids).logits
        with low_precision_linears(teacher, torch.bfloat16):
            assert teacher.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            assert teacher.lm_head.weight.dtype == torch.float32  # tied to the embedding: left alone
            got = teacher(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert all(p is before[name] for name, p in teacher.named_parameters())


def test_compile_auto_only_for_long_runs_of_real_sized_students_and_on_trains_the_same():
    config = DistillConfig()
    assert not config.compile_for("cpu", 1_000_000, 500)  # a tiny model
    assert not config.compile_for("cpu", 90_000_000, 10)  # a short run
    assert not DistillConfig(compile="off").compile_for("cpu", 90_000_000, 500)
    assert DistillConfig(compile="on").compile_for("cpu", 1_000, 1)
    with pytest.raises(DistillError, match="compile 'yes'"):
        DistillConfig(compile="yes")
    teacher, _ = _pair()
    ids = torch.randint(3, 250, (8, 12))
    histories = []
    for mode in ("off", "on"):
        _, student = _pair()
        config = DistillConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, bf16=False, compile=mode, eval_every=2)
        result = distill(student, teacher, ids, config, progress=False, evaluate=lambda m: 1.0)
        histories.append([r["loss"] for r in result.history])
        assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in student.model.layers)
    assert histories[1] == pytest.approx(histories[0], rel=1e-4)


def _kl_from(teacher, ids):
    """An evaluation for the trainer: exp of the student's mean KL from ``teacher`` on ``ids`` (1.0 when equal)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits, -1)  # before training casts the teacher to bf16

    def evaluate(student):
        with torch.no_grad():
            mine = torch.log_softmax(student(input_ids=ids).logits, -1)
            return float(torch.exp((target.exp() * (target - mine)).sum(-1).mean()))
    return evaluate


def test_learning_rate_guard_puts_the_weights_back_and_lowers_the_peak():
    from distill.backoff import LearningRateGuard

    params = [torch.randn(4, 3), torch.randn(5)]
    start = [p.clone() for p in params]
    guard = LearningRateGuard(DistillConfig(steps=20, lr=1e-3, warmup_steps=4, lr_backoffs=2), 20, [], params, True)
    guard.baseline = 10.0
    assert [s for s in range(1, 21) if guard.due(s)] == [5]  # right after the 4 warmup steps
    for p in params:
        p.add_(1.0)
    record = guard.check(5, 12.0, params)
    assert record == {"from": 1e-3, "to": pytest.approx(1e-4), "validation": 12.0, "baseline": 10.0}
    assert all(torch.equal(p, s) for p, s in zip(params, start, strict=True))
    # The schedule restarts over the 15 steps left: warmup over a quarter of them (3), then the next check.
    assert guard.lr(5) == pytest.approx(1e-4 / 3) and guard.lr(7) == pytest.approx(1e-4)
    assert [s for s in range(1, 21) if guard.due(s)] == [9]
    assert guard.check(9, 9.0, params) is None and not any(guard.due(s) for s in range(1, 21))
    assert guard.peak == pytest.approx(1e-4)


def test_a_student_that_starts_at_its_teacher_is_not_wrecked_by_a_high_learning_rate():
    teacher, _ = _pair()
    student = copy.deepcopy(teacher)
    ids, held_out = torch.randint(3, 250, (64, 16)), torch.randint(3, 250, (8, 16))
    config = DistillConfig(steps=24, batch_size=8, lr=3e-2, warmup_steps=2, kl_weight=0.5, ce_weight=0.5,
                           eval_every=0, lr_backoffs=2)
    result = distill(student, teacher, ids, config, evaluate=_kl_from(teacher, held_out), progress=False)
    backoffs = [r for r in result.history if "lr_backoff" in r]
    # Each check right after warmup finds the student further from its teacher than at the start (1.0): two
    # backoffs, 3e-2 -> 3e-3 -> 3e-4, each a restart from the initial weights over the steps left.
    assert [r["step"] for r in backoffs] == [3, 6]
    assert [r["lr_backoff"]["to"] for r in backoffs] == [pytest.approx(3e-3), pytest.approx(3e-4)]
    assert all(r["lr_backoff"]["baseline"] == pytest.approx(1.0) for r in backoffs)
    assert result.peak_lr == pytest.approx(3e-4) and max(r["lr"] for r in result.history[6:]) == pytest.approx(3e-4)

    unguarded = copy.deepcopy(teacher).requires_grad_(True)  # distill() froze the teacher
    plain = distill(unguarded, teacher, ids, dataclasses.replace(config, lr_backoffs=0),
                    evaluate=_kl_from(teacher, held_out), progress=False)
    assert result.history[-1]["val_perplexity"] < plain.history[-1]["val_perplexity"]
    assert plain.peak_lr == 3e-2 and not any("lr_backoff" in r for r in plain.history)


def test_no_checkpoint_before_a_pending_check_so_a_resumed_run_takes_the_same_path(tmp_path):
    teacher, _ = _pair()
    ids, held_out = torch.randint(3, 250, (64, 16)), torch.randint(3, 250, (8, 16))
    config = DistillConfig(steps=12, batch_size=8, lr=3e-2, warmup_steps=2, eval_every=0, lr_backoffs=2,
                           checkpoint_every=1, keep_checkpoints=100, bf16=False)
    straight = copy.deepcopy(teacher).requires_grad_(True)
    result = distill(straight, teacher, ids, config, evaluate=_kl_from(teacher, held_out),
                     checkpoint_dir=tmp_path / "straight", progress=False)
    assert [r["step"] for r in result.history if "lr_backoff" in r] == [3, 6]
    # Checkpoints only from the last check on: the steps before it could not be resumed with their check.
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "straight").glob("step-*"))
    assert saved == list(range(6, 13))
    for late in (tmp_path / "straight").glob("step-*"):
        if int(late.name.split("-")[1]) > 6:
            shutil.rmtree(late)
    resumed = copy.deepcopy(teacher).requires_grad_(True)
    again = distill(resumed, teacher, ids, config, evaluate=_kl_from(teacher, held_out),
                    checkpoint_dir=tmp_path / "straight", resume=True, progress=False)
    assert again.resumed_from_step == 6 and again.peak_lr == pytest.approx(3e-4)
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_guard_leaves_a_learning_rate_that_helps_alone():
    teacher, student = _pair()
    ids, held_out = torch.randint(3, 250, (64, 16)), torch.randint(3, 250, (8, 16))
    config = DistillConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0, lr_backoffs=2)
    result = distill(student, teacher, ids, config, evaluate=_kl_from(teacher, held_out), progress=False)
    assert "val_perplexity" in result.history[2]  # the check, after step 3
    assert result.peak_lr == 3e-3 and not any("lr_backoff" in r for r in result.history)
