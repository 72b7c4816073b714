"""The 0.1 saves of tests/test_io.py: run with lens_laai 0.1 (commit 2a68bfc) first on PYTHONPATH.

PYTHONPATH=<checkout of 2a68bfc> python tests/data/saves_0_1/make_saves.py tests/data/saves_0_1
"""

import json
import sys
from pathlib import Path

import torch

from lens_laai import evaluate, fit
from lens_laai.ablation import HeadAblation
from lens_laai.baselines.residual import ResidualIntervention
from lens_laai.bridge import model_fingerprint, model_name
from lens_laai.prompts import make_batch
from lens_laai.protocol import load_intervention
from lens_laai.testing import tiny_model, tiny_task

out = Path(sys.argv[1])
model = tiny_model()
splits = tiny_task().split(0, 8, 4)
result = fit(model, splits, layer=1, steps=5, progress=False)
iv = result.intervention
iv.save(out / "head")
batch = make_batch(model.tokenizer, ["Q: hot\nA:", "Q: big\nA:"], [" cold", " small"])
HeadAblation.mean(model, [(1, 0), (2, 3)], [batch]).save(out / "ablation")
g = torch.Generator().manual_seed(0)
ResidualIntervention(torch.randn(model.cfg.d_model, generator=g), 2, model_name(model), model_fingerprint(model)).save(
    out / "residual"
)

acc = evaluate(model, splits, iv).accuracy
logits = {}
for name in ("head", "ablation", "residual"):
    loaded = load_intervention(out / name, model)
    with torch.no_grad(), loaded.apply(model):
        logits[name] = model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1, :16].tolist()
expected = {
    "head_test_accuracy": acc,
    "head_selected": [list(h) for h in iv.selected_heads()],
    "prompts": batch.prompts,
    "last_token_logits_first_16": logits,
}
(out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
print("ok", acc, iv.selected_heads())
