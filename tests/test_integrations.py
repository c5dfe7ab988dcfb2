"""Hugging Face ecosystem: Trainer (accelerate underneath) and datasets train a reshaped model, its learned variant
state moves and survives save/reload; push_to_hub uploads the config file."""

import json

import torch
import transformers
from datasets import Dataset

import hf_reshape
from hf_reshape.integration import STATE_ATTR

from conftest import tiny_model


def test_trainer_fine_tunes_a_reshaped_model_and_reloads_it(tmp_path):
    model = tiny_model("bert", cls="BertForSequenceClassification")
    hf_reshape.reshape(model, "linformer", proj_len=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if STATE_ATTR in n}
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "input_ids": torch.randint(1, 101, (16, 12), generator=g).tolist(),
        "attention_mask": [[1] * 12] * 8 + [[1] * 7 + [0] * 5] * 8,
        "labels": [0, 1] * 8,
    })
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if STATE_ATTR in n and not torch.equal(p, before[n])]
    assert moved, "the Linformer projections did not train"
    trainer.save_model(str(tmp_path / "final"))
    loaded = hf_reshape.from_pretrained(tmp_path / "final")
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded.eval()(**batch).logits)


def test_push_to_hub_uploads_the_config(monkeypatch):
    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, exist_ok, private):
            calls["repo"] = repo_id

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message, **kwargs):
            with open(path_or_fileobj) as f:
                calls["uploaded"] = (path_in_repo, f.read())
            return "https://hub/commit/1"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cfg = hf_reshape.ReshapeConfig("sliding_window", window=64)
    assert hf_reshape.ReshapeConfig("sliding_window", window=64).push_to_hub("me/bert-window-64") == "https://hub/commit/1"
    name, text = calls["uploaded"]
    assert calls["repo"] == "me/bert-window-64" and name == "reshape_config.json"
    assert hf_reshape.ReshapeConfig.from_dict(json.loads(text)) == cfg
