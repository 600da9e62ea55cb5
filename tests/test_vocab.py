"""Vocabulary trimming: the trimmed tokenizer spells covered text the same way, the planner keeps every token the
data uses, surgery keeps the kept tokens' logits, and a run trims end to end with per-teacher-token figures."""

import dataclasses
import json

import pytest
import torch
from factories import TEXT, tiny_llama, tiny_tokenizer, write_corpus, write_teacher
from transformers import AutoModelForCausalLM, AutoTokenizer

from compress.app.cli import main
from compress.core.config import BLOCK_AXES, DISTILL_DEFAULTS, CompressConfig, PruneConfig
from compress.deploy.quantization import quantize_graphs
from compress.errors import ConfigError
from compress.pruning.archspec import resolve
from compress.pruning.planner import TargetSize, plan
from compress.pruning.scoring import magnitude_scores
from compress.pruning.surgery import prune
from compress.pruning.vocab import VocabMap, floor_tokens, trim_tokenizer, vocab_scores

# Trained on more than the corpus (write_corpus uses TEXT): tokens of this paragraph can go, and general English has them.
ENGLISH = ("You can change the brightness of your screen to save power or to make it more readable in bright light. "
           "Open the Settings window, choose Displays, and drag the slider; when you close the window the change stays.")
SEEN = "The kernel schedules tasks on every processor. Each task has a priority and a time slice."
UNSEEN = "Memory is divided into pages; a page fault brings the missing page in from the disk."


def _kept(tokenizer, text: str = SEEN, vocab: int = 256) -> list[int]:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    scores, floor = vocab_scores(tokenizer, vocab, [ids])
    return sorted(torch.topk(scores, floor).indices.tolist())


def test_trimmed_tokenizer_spells_covered_text_the_same_way_and_any_text_still(tmp_path):
    tokenizer = tiny_tokenizer(add_bos=True)
    kept = _kept(tokenizer)
    assert set(floor_tokens(tokenizer)) <= set(kept) and len(kept) < len(tokenizer)
    trimmed = trim_tokenizer(tokenizer, kept)
    trimmed.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(loaded) == len(kept)
    to_student = {old: new for new, old in enumerate(kept)}
    # Text the kept tokens cover: the same tokens, renumbered (the bos special too).
    assert loaded(SEEN)["input_ids"] == [to_student[i] for i in tokenizer(SEEN)["input_ids"]]
    assert loaded.bos_token == "<s>" and loaded.bos_token_id == to_student[tokenizer.bos_token_id]
    # Other text still tokenizes, into more (smaller) pieces, and decodes to the same string.
    teacher_ids, student_ids = tokenizer(UNSEEN)["input_ids"], loaded(UNSEEN)["input_ids"]
    assert any(i not in to_student for i in teacher_ids) and len(student_ids) > len(teacher_ids)
    assert loaded.decode(student_ids, skip_special_tokens=True) == tokenizer.decode(teacher_ids, skip_special_tokens=True)


def test_teacher_sequences_convert_to_the_student_vocabulary_at_the_same_length():
    tokenizer = tiny_tokenizer()
    kept = _kept(tokenizer)
    vocab_map = VocabMap(kept, 256, tokenizer)
    seen, unseen = tokenizer(SEEN * 3)["input_ids"][:24], tokenizer(UNSEEN * 3)["input_ids"][:24]
    ids = torch.tensor([seen, unseen])
    converted = vocab_map.convert(ids, ids[:, 1:])
    assert converted.ids.shape == ids.shape
    assert converted.ids[0].tolist() == vocab_map.student_ids(ids[0]).tolist()  # a covered row is only renumbered
    # A row with removed tokens spells the same text with kept pieces, cut at the same length.
    spelled = vocab_map.tokenizer.decode(converted.ids[1])
    assert tokenizer.decode(ids[1]).startswith(spelled[: len(spelled) - 8])
    assert converted.teacher_tokens[0] == 23 and converted.teacher_tokens[1] < 23
    assert converted.nll_scale() > 1.0 and converted.nll_scale(1) == 1.0
    # The teacher's choices sit where the student predicts the start of a teacher token, -1 elsewhere.
    assert int((converted.teacher_top1[1] >= 0).sum()) == int(converted.teacher_tokens[1])
    with pytest.raises(ValueError, match="not in the trimmed vocabulary"):
        vocab_map.student_ids(ids[1])


def test_planner_trims_the_vocabulary_first_where_the_embedding_dominates_and_logits_survive():
    tokenizer = tiny_tokenizer()
    teacher = tiny_llama(vocab_size=2048)  # rows past the tokenizer's 256 are never used: 131k of 205k params
    spec = resolve(teacher)
    ids = torch.tensor([tokenizer(TEXT)["input_ids"][:64]])
    scores = magnitude_scores(teacher, spec)
    scores.scores["vocab"], floor = vocab_scores(tokenizer, spec.vocab, [ids], teacher.config)
    chosen = plan(spec, teacher.config, scores, TargetSize.parse("0.5x"), axes=("hidden", "mlp", "vocab"), align=16,
                  tolerance=0.1, proxy="mass", vocab_floor=floor)
    assert chosen.shape.vocab % 16 == 0 and floor <= chosen.shape.vocab < 2048
    assert (chosen.shape.hidden, chosen.shape.mlp) == (64, 128)  # the blocks are untouched: the unused rows pay
    assert set(ids[0].tolist()) <= set(chosen.kept["vocab"])
    assert chosen.config["vocab_size"] == chosen.shape.vocab
    student = prune(teacher, spec, chosen.shape, chosen.kept)
    assert sum(p.numel() for p in student.parameters()) == chosen.params
    vocab_map = VocabMap(chosen.kept["vocab"], spec.vocab, tokenizer)
    with torch.no_grad():
        expected = teacher(ids).logits[..., vocab_map.kept]
        got = student(vocab_map.student_ids(ids)).logits
    torch.testing.assert_close(got, expected)
    assert student.config.eos_token_id == vocab_map.to_student[2]


def test_a_run_trims_the_vocabulary_end_to_end_and_reports_per_teacher_token(tmp_path, monkeypatch):
    # One layer with a small MLP: the 256-token embedding is half the model, and 0.9x leaves room for 192 tokens of
    # it, fewer than the tokenizer has (its floor here, the corpus's tokens and the alphabet, is 178).
    # Its merges learned mostly from English the corpus never uses, so the kept ids are not a prefix of the
    # teacher's: student and teacher ids differ.
    teacher = write_teacher(tmp_path, tiny_llama(mlp=32, layers=1), tiny_tokenizer(text=(ENGLISH + " ") * 60 + TEXT))
    out = tmp_path / "run"
    args = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.9x", "--out", out,
            "--axes", "vocab", "--calib-samples", "8", "--calib-seq-len", "16", "--eval-samples", "4",
            "--eval-seq-len", "32", "--align", "32", "--tolerance", "0.03", "--search-candidates", "2",
            "--batch-size", "4", "--quiet", "--distill-tokens", "256", "--distill-seq-len", "16",
            "--distill-batch-size", "4", "--seq-len", "32", "--quant", "a16w8", "--quant-calib-samples", "2"]
    assert main([str(a) for a in args]) == 0
    chosen = json.loads((out / "plan.json").read_text())
    vocab = chosen["shape"]["vocab"]
    assert vocab == 192
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    tokenizer = AutoTokenizer.from_pretrained(out / "student")
    assert student.config.vocab_size == vocab == len(chosen["kept"]["vocab"]) and len(tokenizer) <= vocab
    assert chosen["kept"]["vocab"] != list(range(vocab))
    metrics = {s: json.loads((out / f"{s}.metrics.json").read_text()) for s in ("prune", "distill", "export", "quantize")}
    general = metrics["prune"]["evals"]["general-english"]
    # General English uses tokens the training data never did: they are spelled in pieces, and the figures are per
    # teacher token of the same text (fewer tokens than the student reads).
    assert general["tokens"] < 4 * 31
    assert metrics["distill"]["evals"]["general-english"]["perplexity"] > 0
    fp32 = metrics["export"]["fp32"]
    assert fp32["evals"]["general-english"]["tokens"] < 4 * 31 and 0 <= fp32["agreement"] <= 1
    assert metrics["quantize"]["violations"] == []
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]
    # Quantization-aware training reads the training split in the student's ids, as the split table's token counts
    # do (teacher ids would name other tokens): the same split, so its first sequences are the counted ones.
    seen = {}

    def spy(*a, **kw):
        seen.update(kw)
        return quantize_graphs(*a, **kw)

    monkeypatch.setattr("compress.deploy.quantization.quantize_graphs", spy)
    qat = ["--quant", "w4a16", "--quant-decode-calib-tokens", "16", "--quant-qat-tokens", "128"]
    assert main([str(a) for a in [*args, *qat]]) == 0
    trained, counted = seen["qat"].ids, seen["frequency_ids"]
    assert trained.shape == (4, 32) and (trained != counted[:4]).sum() == 0 and counted.max() < vocab
    assert json.loads((out / "quantize.metrics.json").read_text())["qat"]["tokens"] == 128


def test_a_family_that_keeps_the_teachers_vocabulary_refuses_the_vocab_axis(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama())
    args = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.5x", "--out", tmp_path / "mu",
            "--student", "mu", "--axes", "hidden,vocab", "--quiet"]
    assert main([str(a) for a in args]) == 2
    assert "drop 'vocab' from --axes" in capsys.readouterr().err


@pytest.mark.real_teacher
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_real_tokenizers_trim_to_the_data_and_spell_covered_text_the_same_way(alias):
    """SmolLM2's byte-level BPE (alphabet floor) and Gemma3's byte-fallback BPE (byte-token floor), on the real corpus."""
    from compress.io import cache_dir
    from compress.sources.data import load_corpus, token_batches
    from compress.sources.teachers import resolve_teacher

    if alias != "smollm2-135m" and not (cache_dir() / "teachers" / alias / "tokenizer.json").exists():
        pytest.skip(f"{alias} is not fetched on this machine (the setup fetches smollm2-135m only)")
    source = resolve_teacher(alias)
    tokenizer = AutoTokenizer.from_pretrained(source)
    corpus = load_corpus(None)
    train = token_batches(corpus, tokenizer, "train", 256, 256)
    scores, floor = vocab_scores(tokenizer, len(tokenizer), [train])
    kept = sorted(torch.topk(scores, floor).indices.tolist())
    vocab_map = VocabMap(kept, len(tokenizer), tokenizer)
    assert floor < len(tokenizer) // 2
    documents = [t for t in corpus["text"][:400] if t.strip()]
    lines = [line for t in documents for line in t.splitlines() if len(line) > 20]
    covered = [t for t in lines if bool((vocab_map.to_student[torch.tensor(tokenizer(t)["input_ids"])] >= 0).all())]
    assert len(covered) >= 20 and len(covered) < len(lines)
    for text in covered:
        assert vocab_map.tokenizer(text)["input_ids"] == vocab_map.student_ids(torch.tensor(tokenizer(text)["input_ids"])).tolist()
    for text in documents[:50]:  # anything else still tokenizes into kept pieces and decodes to the same text
        assert vocab_map.tokenizer.decode(vocab_map.tokenizer(text)["input_ids"], skip_special_tokens=True) == \
            tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)


def test_axes_auto_trims_the_vocabulary_where_the_embedding_dominates_and_only_there(tmp_path):
    teacher = write_teacher(tmp_path, tiny_llama(vocab_size=2048))  # the embedding: 131k of 205k parameters
    data = write_corpus(tmp_path)
    common = ["--data", data, "--target-size", "0.8x", "--calib-samples", "8", "--calib-seq-len", "16", "--align",
              "16", "--tolerance", "0.15", "--proxy", "mass", "--stop-after", "plan", "--quiet"]
    assert main([str(a) for a in ["--teacher", teacher, "--out", tmp_path / "auto", *common]]) == 0
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["prune"]["axes"] == ["heads", "hidden", "mlp", "vocab"]  # the run records what auto meant
    assert json.loads((tmp_path / "auto" / "plan.json").read_text())["shape"]["vocab"] < 2048
    assert "--axes auto: heads,hidden,mlp,vocab (the embedding is 64%" in (tmp_path / "auto" / "run.log").read_text()
    # A teacher whose blocks dominate keeps its whole vocabulary.
    small = write_teacher(tmp_path / "small", tiny_llama())
    assert main([str(a) for a in ["--teacher", small, "--out", tmp_path / "blocks", *common]]) == 0
    assert json.loads((tmp_path / "blocks" / "config.json").read_text())["prune"]["axes"] == ["heads", "hidden", "mlp"]
    assert json.loads((tmp_path / "blocks" / "plan.json").read_text())["shape"]["vocab"] is None


def _unigram_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator([TEXT + " " + ENGLISH], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_a_tokenizer_that_cannot_be_trimmed_is_refused_before_scoring_and_auto_keeps_its_vocabulary(tmp_path, capsys):
    teacher = write_teacher(tmp_path, tiny_llama(vocab_size=2048), _unigram_tokenizer())
    common = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.8x", "--calib-samples", "8",
              "--calib-seq-len", "16", "--align", "16", "--tolerance", "0.15", "--proxy", "mass", "--stop-after", "plan"]
    assert main([str(a) for a in [*common, "--out", tmp_path / "vocab", "--axes", "heads,hidden,mlp,vocab", "--quiet"]]) == 2
    assert "rewrites BPE tokenizers; this teacher's is Unigram. Drop 'vocab' from --axes" in capsys.readouterr().err
    assert not (tmp_path / "vocab").exists()  # refused before the score stage wrote anything
    assert main([str(a) for a in [*common, "--out", tmp_path / "auto"]]) == 0
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["prune"]["axes"] == list(BLOCK_AXES)
    log = (tmp_path / "auto" / "run.log").read_text()
    assert "--axes auto: heads,hidden,mlp, though the embedding is 64%" in log and "adding 'vocab'" not in log


def test_a_target_below_the_vocabulary_floor_is_refused_before_scoring(tmp_path, capsys):
    # At 0.6x the whole-width blocks leave room for fewer tokens than the floor (the corpus's tokens and the
    # alphabet, 178 of 256): the shape is feasible only for a floor of 0, and the nearest one is 0.5x.
    teacher = write_teacher(tmp_path, tiny_llama(mlp=32, layers=1), tiny_tokenizer(text=TEXT + " " + ENGLISH))
    args = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.6x", "--out", tmp_path / "run",
            "--axes", "hidden,vocab", "--align", "32", "--stop-after", "plan", "--quiet"]
    assert main([str(a) for a in args]) == 2
    assert "--target-size 0.6x" in (err := capsys.readouterr().err) and "(0.50x)" in err
    assert not (tmp_path / "run").exists()


def test_axes_auto_keeps_the_vocabulary_for_teacher_top_k_which_refuses_the_vocab_axis():
    config = CompressConfig(distill=dataclasses.replace(DISTILL_DEFAULTS, teacher_top_k=32))
    assert config.resolve_axes(0.63, trims_vocab=True).prune.axes == BLOCK_AXES
    assert CompressConfig().resolve_axes(0.63, trims_vocab=True).prune.axes == (*BLOCK_AXES, "vocab")
    assert CompressConfig().resolve_axes(0.63, trims_vocab=False).prune.axes == BLOCK_AXES
    with pytest.raises(ConfigError, match="--distill-teacher-top-k 0"):
        CompressConfig(prune=PruneConfig(axes=("hidden", "vocab")), distill=config.distill)


def test_the_plan_suggests_the_vocab_axis_where_the_embedding_dominates(tmp_path):
    teacher = write_teacher(tmp_path, tiny_llama(vocab_size=2048))  # the embedding: 131k of 205k parameters
    args = ["--teacher", teacher, "--data", write_corpus(tmp_path), "--target-size", "0.8x", "--out", tmp_path / "run",
            "--calib-samples", "8", "--calib-seq-len", "16", "--align", "16", "--tolerance", "0.15", "--proxy", "mass",
            "--axes", "heads,hidden,mlp", "--stop-after", "plan", "--quiet"]
    assert main([str(a) for a in args]) == 0
    assert "the embedding is 64% of the teacher's parameters: adding 'vocab' to --axes" in (tmp_path / "run" / "run.log").read_text()
