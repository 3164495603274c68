"""Publishing a finished run (etu_hf.hub.push_run) and loading it back (etu_hf.hub.load_unlearned),
through a real HTTP exchange with the stand-in hub of tests/hub_server.py.

The stand-in is extended here to serve what was uploaded (repo info, tree listing, file downloads),
so ``snapshot_download`` works against it and the round trip push -> load is tested end to end: the
reloaded adapter reproduces the audit's unlearned mass on the same held-out blocks. Every refusal
(bad repo id, missing folder, not a run, no model, no token, a token inside a file) happens before
any request reaches the server; HF_HUB_OFFLINE=1 says nothing was pushed and where the files are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from helpers import audit_table
from hub_server import HubStandIn, _Handler
from huggingface_hub import ModelCard

from etu_hf.demo import DEMO_MODEL_DIR
from etu_hf.hub import PushError, files_to_push, load_unlearned, push_run

TOKEN = "hf_StandInTokenForHubPushTests0123456789"
REPO = "etu-user/etu-unlearned"
BRANCH = "unlearned-v1"
SHA = "e7" * 20
EPS = 0.05


class _ServingHandler(_Handler):
    """The stand-in's handler, plus the read side of the hub API that ``snapshot_download`` uses."""

    def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> bool:
        path = urlsplit(self.path).path
        uploads = self.server.uploads
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/revision/[^/]+", path):
            repo = path.split("/api/models/", 1)[1].split("/revision/", 1)[0]
            info = {"id": repo, "sha": SHA, "private": False, "siblings": [{"rfilename": p} for p in uploads]}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            return True
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/tree/[^/]+(/.*)?", path):
            tree = [
                {"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                for p, b in sorted(uploads.items())
            ]
            self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            return True
        match = re.fullmatch(r"/[^/]+/[^/]+/resolve/[^/]+/(.+)", path)
        if match and unquote(match.group(1)) in uploads:
            data = uploads[unquote(match.group(1))]
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": SHA,
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
            }
            self._send(200, data, headers)
            return True
        return False

    def do_HEAD(self) -> None:
        if self._serve():
            self.server.requests.append(("HEAD", self.path, dict(self.headers)))
        else:
            super().do_HEAD()

    def do_GET(self) -> None:
        if self._serve():
            self.server.requests.append(("GET", self.path, dict(self.headers)))
        else:
            super().do_GET()

    def do_POST(self) -> None:
        if re.fullmatch(r"/api/models/[^/]+/[^/]+/branch/[^/]+", urlsplit(self.path).path):
            self._body()
            self.server.requests.append(("POST", self.path, dict(self.headers)))
            self._reply(200, {})
        else:
            super().do_POST()


class ServingHub(HubStandIn):
    """The stand-in hub that also serves the files pushed to it."""

    def __init__(self) -> None:
        super().__init__()
        self.RequestHandlerClass = _ServingHandler


def hub_env(hub: HubStandIn, tmp_path: Path, token: str | None) -> dict[str, str]:
    """The environment of a subprocess that talks to ``hub``: online, a fresh HF_HOME (no login), the
    token in HF_TOKEN when given."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE") and k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(tmp_path / "hf_home"))
    if token:
        env["HF_TOKEN"] = token
    return env


def run_script(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def audited_run(trained, corpora, tmp_path_factory):
    """A copy of the short real run of conftest's ``trained``, audited into its folder on the held-out
    corpora, with the folders a push must skip (a checkpoint, a moved-aside previous run) and a generic
    README.md as Trainer writes it."""
    from etu_hf import ForbiddenSet, audit

    trainer, out = trained
    run = tmp_path_factory.mktemp("hub_push") / "run"
    shutil.copytree(out, run)
    audit(
        trainer.model,
        corpora["forget_heldout"],
        ForbiddenSet.load(str(run)),
        epsilon=EPS,
        retain_data=corpora["retain_heldout"],
        output_dir=str(run),
        overwrite=True,
        progress=False,
        num_samples=0,
        bootstrap_samples=200,
    )
    for skipped in ("checkpoint-3", "_previous_run_1", "runs"):
        (run / skipped).mkdir(exist_ok=True)
        (run / skipped / "adapter_model.safetensors").write_bytes(b"not for upload")
    (run / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    return run


PUSH_AND_LOAD = textwrap.dedent(
    """
    import json
    from transformers import AutoTokenizer
    from etu_hf import evaluate_mass
    from etu_hf.data.blocks import iter_batches, tokenize_and_block
    from etu_hf.demo.corpus import forget_documents
    from etu_hf.hub import load_unlearned, push_run

    url = push_run(RUN, REPO, revision=BRANCH, commit_message="unlearned", tags=["test"])
    model, forbidden = load_unlearned(REPO, revision=BRANCH)
    tok = AutoTokenizer.from_pretrained(MODEL)
    blocks = tokenize_and_block(forget_documents(40, seed=999), tok, 64)  # conftest's corpora["forget_heldout"]
    mass = evaluate_mass(model, iter_batches(blocks, None, 8), forbidden.ids)
    print("RESULT " + json.dumps({"url": url, "mass": mass.mean, "positions": mass.n_positions,
                                  "peft": type(model).__name__, "ids": forbidden.ids}))
    """
)


def test_push_then_load_reproduces_the_audit(audited_run, tmp_path):
    run = audited_run
    report = json.loads((run / "suppression_report.json").read_text())
    with ServingHub() as hub:
        code = f"RUN={str(run)!r}; REPO={REPO!r}; BRANCH={BRANCH!r}; MODEL={DEMO_MODEL_DIR!r}\n" + PUSH_AND_LOAD
        done = run_script(code, hub_env(hub, tmp_path, TOKEN))
        uploads = dict(hub.uploads)
        requests = list(hub.requests)
    result = json.loads(done.stdout.split("RESULT ", 1)[1])

    # what was uploaded: the run's top-level files that a push publishes, byte for byte, and the card
    expected = set(files_to_push(str(run)))
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "V_S.ids.json",
        "suppression_report.json",
        "suppression_report.md",
        "metrics.json",
        "args.json",
        "lambda_history.json",
    ):
        assert name in expected, sorted(expected)
    assert set(uploads) == expected | {"README.md"}
    for name in expected:
        assert uploads[name] == (run / name).read_bytes(), name
    assert not any(p.startswith(("checkpoint-", "_previous_run_", "runs")) for p in uploads)

    # the card: YAML metadata and the audit table with the report's numbers
    card_text = uploads["README.md"].decode()
    assert card_text != (run / "README.md").read_text()
    data = ModelCard(card_text).data
    assert data.library_name == "peft" and data.tags[:2] == ["etu-hf", "unlearning"] and "test" in data.tags
    rows = audit_table(card_text)
    assert rows["held-out forget mass on V_S"][:2] == [f"{report['base_p_S']:.4f}", f"{report['updated_p_S']:.4f}"]
    assert rows["upper bound (sequence-level, 95%)"][1] == f"{report['updated_p_S_upper']:.4f}"
    assert rows["held-out retain perplexity"][2] == f"ratio {report['perplexity_ratio']:.3f}"
    assert ("**reached**" in card_text) == bool(report["target_achieved_upper"])
    assert f'load_unlearned("{REPO}")' in card_text

    # the token: used for the requests, in no uploaded byte and no output
    assert not any(TOKEN.encode() in data for data in uploads.values())
    assert TOKEN not in done.stdout and TOKEN not in done.stderr
    assert all(TOKEN not in path for _, path, _ in requests)
    assert any(h.get("authorization", h.get("Authorization")) == f"Bearer {TOKEN}" for _, _, h in requests)
    assert any(m == "POST" and path.endswith(f"/branch/{BRANCH}") for m, path, _ in requests)
    assert any(m == "POST" and f"/commit/{BRANCH}" in path for m, path, _ in requests)
    assert result["url"].endswith(f"/commit/{'0' * 40}")

    # the round trip: the downloaded adapter on its base reproduces the audit's unlearned mass
    assert result["peft"] == "PeftModel"
    assert result["ids"] == json.loads((run / "V_S.ids.json").read_text())["ids"]
    assert result["positions"] == report["forget_positions"]
    assert result["mass"] == pytest.approx(report["updated_p_S"], rel=1e-9, abs=1e-12)
    assert any(path.startswith(f"/{REPO}/resolve/") for _, path, _ in requests)


def test_load_from_the_local_folder(audited_run, corpora):
    from etu_hf import evaluate_mass
    from etu_hf.data.blocks import iter_batches

    report = json.loads((audited_run / "suppression_report.json").read_text())
    model, forbidden = load_unlearned(str(audited_run))
    assert type(model).__name__ == "PeftModel" and not model.training
    mass = evaluate_mass(model, iter_batches(corpora["forget_heldout"], None, 8), forbidden.ids)
    assert mass.mean == pytest.approx(report["updated_p_S"], rel=1e-9, abs=1e-12)


BAD_INPUT = textwrap.dedent(
    """
    import json
    from etu_hf.hub import push_run

    cases = {
        "bad_repo_id": (RUN, "etu-user/bad..name", TOKEN),
        "nested_repo_id": (RUN, "a/b/c", TOKEN),
        "missing_folder": (MISSING, REPO, TOKEN),
        "not_a_run": (NOT_A_RUN, REPO, TOKEN),
        "no_model": (NO_MODEL, REPO, TOKEN),
        "token_in_a_file": (LEAKY, REPO, TOKEN),
        "no_token": (RUN, REPO, None),
    }
    out = {}
    for name, (folder, repo, token) in cases.items():
        try:
            push_run(folder, repo, token=token)
            out[name] = ["pushed", ""]
        except Exception as err:
            out[name] = [type(err).__name__, str(err)]
    print("RESULT " + json.dumps(out))
    """
)


def test_bad_input_is_refused_before_any_request(audited_run, tmp_path):
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "adapter_config.json").write_text("{}")
    no_model = tmp_path / "no_model"
    no_model.mkdir()
    for name in ("V_S.ids.json", "metrics.json"):
        shutil.copy(audited_run / name, no_model / name)
    leaky = tmp_path / "leaky"
    shutil.copytree(audited_run, leaky, ignore=shutil.ignore_patterns("checkpoint-*", "_previous_run_*", "runs"))
    args = json.loads((leaky / "args.json").read_text())
    (leaky / "args.json").write_text(json.dumps({**args, "hub_token": TOKEN}))
    with HubStandIn() as hub:
        folders = dict(RUN=audited_run, MISSING=tmp_path / "missing", NOT_A_RUN=not_a_run, NO_MODEL=no_model)
        head = "".join(f"{k}={str(v)!r}; " for k, v in {**folders, "LEAKY": leaky}.items())
        done = run_script(f"{head}REPO={REPO!r}; TOKEN={TOKEN!r}\n" + BAD_INPUT, hub_env(hub, tmp_path, None))
        requests = hub.hub_requests()
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    expected = {
        "bad_repo_id": "invalid repo id",
        "nested_repo_id": "invalid repo id",
        "missing_folder": "does not exist",
        "not_a_run": "is not a finished etu-hf run",
        "no_model": "holds no saved model",
        "token_in_a_file": "contains the hub token",
        "no_token": "no Hugging Face token",
    }
    for name, phrase in expected.items():
        kind, message = result[name]
        assert kind == "PushError", (name, kind, message)
        assert phrase in message and "nothing was pushed" in message, (name, message)
        assert TOKEN not in message
    assert str(tmp_path / "missing") in result["missing_folder"][1]
    assert str(audited_run) in result["no_token"][1]  # where the local files are
    assert requests == []
    assert TOKEN not in done.stderr


def test_offline_says_nothing_was_pushed_and_where_the_files_are(audited_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError) as err:
        push_run(str(audited_run), REPO, token=TOKEN)
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message and "nothing was pushed" in message
    assert os.path.abspath(audited_run) in message
    assert TOKEN not in message


def test_push_command_publishes_the_run_and_refuses_bad_input_with_exit_2(audited_run, tmp_path):
    """``etu-hf push``: the same upload as push_run, the token from --hub_token in no uploaded byte and no
    output; a refusal is one line, exit status 2, and no request."""
    with HubStandIn() as hub:
        env = hub_env(hub, tmp_path, None)  # no HF_TOKEN, no login
        argv = [sys.executable, "-m", "etu_hf", "push", "--output_dir", str(audited_run), "--repo_id", REPO]
        refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert hub.hub_requests() == []
        done = subprocess.run(
            [*argv, "--hub_token", TOKEN, "--private", "--commit_message", "from the CLI", "--tags", "cli"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        uploads = dict(hub.uploads)
        requests = list(hub.requests)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line, no traceback
    assert "etu-hf push: error: no Hugging Face token" in refused.stderr and "nothing was pushed" in refused.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"to {REPO}" in done.stdout
    assert set(uploads) == set(files_to_push(str(audited_run))) | {"README.md"}
    assert "cli" in ModelCard(uploads["README.md"].decode()).data.tags
    assert not any(TOKEN.encode() in data for data in uploads.values())
    assert TOKEN not in done.stdout + done.stderr
    assert any(m == "POST" and path.startswith("/api/repos/create") for m, path, _ in requests)


def test_unlearn_push_to_hub_pushes_once_after_the_audit(tmp_path):
    """``etu-hf unlearn --push_to_hub``: no push before the run is audited (the Trainer's own pushes are off),
    then one commit with the report and the card; without a token it refuses before training."""
    from helpers import cli_flags

    from etu_hf.demo.corpus import write_demo_corpora

    forget, retain = write_demo_corpora(str(tmp_path / "data"))
    flags = cli_flags(tmp_path, forget, retain, "--use_lora", "--lora_r", "4", "--lora_alpha", "8", "--use_cpu")
    argv = [sys.executable, "-m", "etu_hf", "unlearn", *flags, "--push_to_hub", "--hub_model_id", REPO]
    with ServingHub() as hub:
        env = hub_env(hub, tmp_path, None)
        refused = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert hub.hub_requests() == [] and not (tmp_path / "run").exists()
        done = subprocess.run([*argv, "--hub_token", TOKEN], capture_output=True, text=True, env=env, timeout=600)
        uploads = dict(hub.uploads)
        requests = list(hub.requests)
    assert refused.returncode == 2 and "no Hugging Face token" in refused.stderr, refused.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    commits = [path for m, path, _ in requests if m == "POST" and "/commit/" in path]
    assert len(commits) == 1  # one upload: no checkpoint or save_model push before it
    assert {"suppression_report.json", "adapter_model.safetensors", "V_S.ids.json", "README.md"} <= set(uploads)
    assert set(uploads) == set(files_to_push(str(run))) | {"README.md"}
    card = uploads["README.md"].decode()
    assert "## Audit on held-out data" in card and "not audited" not in card
    assert json.loads((run / "args.json").read_text())["push_to_hub"] is True
    assert not any(TOKEN.encode() in data for data in uploads.values())
    assert TOKEN not in done.stdout + done.stderr
