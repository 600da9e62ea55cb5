import pytest
import torch
from factories import tiny_llama
from test_distill import _pair

from distill import DistillConfig, DistillError, distill, logit_distillation_loss
from distill.teacher_logits import TeacherTopK, cached_teacher_topk, compute_teacher_topk


def _ids(seed=0, rows=8, length=16):
    return torch.randint(3, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_top_k_kl_equals_the_full_kl_when_k_is_the_vocabulary():
    teacher, student = _pair()
    ids = _ids()
    stored = compute_teacher_topk(teacher, ids, k=256, bf16=False)
    hidden = student.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64)
    with torch.no_grad():
        t_hidden = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 64)
    head, t_head = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    full = logit_distillation_loss(hidden, head, t_hidden, t_head)
    top = logit_distillation_loss(hidden, head, None, None, teacher_log_probs=stored.log_probs.reshape(-1, 256),
                                  teacher_indices=stored.indices.reshape(-1, 256).long())
    assert full.item() > 0.05
    assert top.item() == pytest.approx(full.item(), rel=1e-4)
    grads = [torch.autograd.grad(loss, head, retain_graph=True)[0] for loss in (full, top)]
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    # With a few of the 256 tokens the bucketed KL is a lower bound of the full one (the bucket merges outcomes).
    few = compute_teacher_topk(teacher, ids, k=8, bf16=False)
    eight = logit_distillation_loss(hidden, head, None, None, teacher_log_probs=few.log_probs.reshape(-1, 8),
                                    teacher_indices=few.indices.reshape(-1, 8).long())
    assert 0 < eight.item() <= full.item() + 1e-6


def test_stored_logits_round_trip_are_reused_and_rebuilt_when_teacher_data_or_k_change(tmp_path):
    teacher, _ = _pair()
    ids, path = _ids(), tmp_path / "logits.safetensors"
    first, reused = cached_teacher_topk(teacher, ids, 16, path, bf16=False)
    assert not reused and path.exists() and first.log_probs.shape == (8, 15, 16)
    loaded = TeacherTopK.load(path)
    assert torch.equal(loaded.log_probs, first.log_probs) and torch.equal(loaded.indices, first.indices)
    again, reused = cached_teacher_topk(teacher, ids, 16, path, bf16=False)
    assert reused and torch.equal(again.indices, first.indices)
    other_teacher = tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=2, seed=5, initializer_range=0.2)
    for teacher_, ids_, k in ((other_teacher, ids, 16), (teacher, _ids(seed=1), 16), (teacher, ids, 8)):
        rebuilt, reused = cached_teacher_topk(teacher_, ids_, k, path, bf16=False)
        assert not reused and rebuilt.k == k
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_training_on_stored_logits_lowers_the_kl_and_a_killed_run_resumes_with_them(tmp_path):
    teacher, student = _pair()
    ids = _ids(rows=16)
    config = DistillConfig(steps=6, batch_size=4, lr=3e-3, teacher_top_k=32, eval_every=2, checkpoint_every=2, bf16=False)
    straight = _pair()[1]
    logits = tmp_path / "logits.safetensors"
    result = distill(straight, teacher, ids, config, progress=False, teacher_logits=logits,
                     checkpoint_dir=tmp_path / "a")
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    made = logits.stat().st_mtime_ns

    class Killed(Exception):
        pass

    def die_at_step_four(model, calls=[0]):  # noqa: B006 - a counter across calls
        calls[0] += 1
        if calls[0] == 2:
            raise Killed
        return 1.0

    with pytest.raises(Killed):
        distill(student, teacher, ids, config, evaluate=die_at_step_four, progress=False, teacher_logits=logits,
                checkpoint_dir=tmp_path / "b")
    resumed = distill(student, teacher, ids, config, progress=False, teacher_logits=logits, checkpoint_dir=tmp_path / "b")
    assert resumed.resumed_from_step == 2
    assert logits.stat().st_mtime_ns == made  # reused, not rebuilt
    for a, b in zip(straight.parameters(), student.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_stored_logits_refuse_settings_they_cannot_serve():
    with pytest.raises(DistillError, match="temperature 1"):
        DistillConfig(teacher_top_k=8, temperature=2.0)
    with pytest.raises(DistillError, match="hidden_weight 0"):
        DistillConfig(teacher_top_k=8, hidden_weight=1.0)
    teacher, student = _pair()
    with pytest.raises(DistillError, match="teacher_logits path"):
        distill(student, teacher, _ids(), DistillConfig(steps=1, batch_size=4, teacher_top_k=8), progress=False)
