"""examples/quickstart.ipynb runs top to bottom on a tiny model (its parameters cell replaced)."""

import json
import os
from pathlib import Path

from factories import tiny_llama, write_corpus, write_teacher

NOTEBOOK = Path(__file__).parent.parent / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    teacher = write_teacher(tmp_path, tiny_llama(hidden=64, heads=4, kv_heads=2, mlp=128, layers=3))
    corpus = write_corpus(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert [c for c in code if "parameters" in c["metadata"].get("tags", [])] == code[:1]
    parameters = f"""
TEACHER, DATA, TARGET, OUT = {str(teacher)!r}, {str(corpus)!r}, "0.7x", "runs/notebook"
RUN = dict(calib_samples=8, calib_seq_len=16, eval_samples=4, eval_seq_len=16, align=16, tolerance=0.15,
           search_candidates=3, batch_size=4, distill_tokens=256, distill_seq_len=16, distill_batch_size=4,
           seq_len=16, quant_calib_samples=4, npu_profile="generic-a8w8")
STEPS = {{"calib": (8, 16), "valid": (4, 16), "align": 16, "tolerance": 0.15, "distill_tokens": 512, "seq_len": 16,
         "quant_calib": 4}}
"""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in [{"source": parameters}, *code[1:]]:
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), namespace)  # noqa: S102 - the notebook is ours
    printed = capsys.readouterr().out
    assert namespace["result"].report["verdict"] in printed
    assert (tmp_path / "runs" / "notebook" / "report.md").exists()
    assert os.path.exists(namespace["graphs"].prefill)
    assert namespace["after"].perplexity.perplexity > 0 and 0 <= namespace["after"].agreement <= 1
    assert namespace["a16w8"]["perplexity"] > 0
