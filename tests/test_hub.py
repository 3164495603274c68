"""push_to_hub keeps the Trainer's behaviour: the adapter, V_S.ids.json and the artifacts reach the
hub (a local stand-in server) with etu-hf's model card (built by ETUTrainer.create_model_card from
Trainer's own arguments), and the token appears in no uploaded file and no log."""

import os
import subprocess
import sys
import textwrap

from hub_server import HubStandIn
from huggingface_hub import ModelCard

from etu_hf.demo import DEMO_MODEL_DIR

TOKEN = "hf_StandInTokenForTestsOnly0123456789"

SCRIPT = textwrap.dedent(
    """
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from etu_hf import ETUTrainer, ETUTrainingArguments
    from etu_hf.data.blocks import tokenize_and_block
    from etu_hf.demo.corpus import forget_documents, retain_documents

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    args = ETUTrainingArguments(output_dir=OUT, max_steps=2, per_device_train_batch_size=4, report_to="none",
                                use_cpu=True, save_strategy="no", push_to_hub=False, hub_model_id="etu-user/etu-test",
                                hub_token=TOKEN, pmi_min_count=5, disable_tqdm=True)
    trainer = ETUTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=tokenize_and_block(forget_documents(60), tok, 64),
                         retain_dataset=tokenize_and_block(retain_documents(60), tok, 64),
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trainer.train()
    trainer.push_to_hub(commit_message="unlearned", tags=["mine"], dataset="org/forget-data",
                        finetuned_from="org/base-model", license="mit", language="en")
    print("PUSHED")
    """
)


def test_push_to_hub_uploads_the_unlearned_adapter_and_artifacts(tmp_path):
    out = tmp_path / "out"
    with HubStandIn() as hub:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"))
        code = f"MODEL={DEMO_MODEL_DIR!r}; OUT={str(out)!r}; TOKEN={TOKEN!r}\n" + SCRIPT
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "PUSHED" in done.stdout
        uploads = dict(hub.uploads)
        requests = list(hub.requests)
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "V_S.ids.json",
        "args.json",
        "metrics.json",
        "README.md",
    ):
        assert name in uploads, sorted(uploads)
        assert uploads[name] == (out / name).read_bytes()
    card = uploads["README.md"].decode()
    data = ModelCard(card).data
    assert data.tags[:2] == ["etu-hf", "unlearning"] and "mine" in data.tags and "peft" in data.tags
    assert data.base_model == "org/base-model" and data.datasets == ["org/forget-data"]
    assert data.license == "mit" and data.language == "en" and data.library_name == "peft"
    assert "## ETU settings" in card and "## Audit on held-out data" in card and "V_S" in card
    assert 'load_unlearned("etu-user/etu-test")' in card
    assert "More information needed" not in card  # not Trainer's generic card
    assert not any(TOKEN.encode() in data for data in uploads.values())
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    assert any(
        r[2].get("authorization") == f"Bearer {TOKEN}" or r[2].get("Authorization") == f"Bearer {TOKEN}"
        for r in requests
    )  # the token was used for the upload itself, and only there


def test_create_model_card_before_training_falls_back_to_trainers_card(model, tokenizer, corpora, make_args):
    from helpers import lora_trainer

    args = make_args(max_steps=1)
    trainer = lora_trainer(model, tokenizer, corpora, args)
    trainer.create_model_card(tags="mine")  # nothing of the run in output_dir yet: Trainer's generic card
    card = ModelCard.load(os.path.join(args.output_dir, "README.md"))
    assert {"mine", "etu-hf", "unlearning"} <= set(card.data.tags)
    assert "## Audit on held-out data" not in card.text
