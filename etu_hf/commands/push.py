"""``etu-hf push``: publish a finished run folder to the Hugging Face Hub with its model card.

A thin command over :func:`etu_hf.hub.push.push_run`: the adapter (or full model), the tokenizer,
V_S.ids.json, the audit report, the lambda history and the plots go up in one commit, with the card
(what was unlearned, the ETU settings, the audit and its verdict) as ``README.md``. Every check (repo
id, folder, that it is a finished run with a saved model, offline mode, a token) runs before the first
request; a refusal is one line and exit status 2, like every usage error of ``etu-hf``.

The token comes from ``--hub_token``, else ``HF_TOKEN`` or the ``huggingface_hub`` login; it is sent
only in the requests' ``Authorization`` header and written nowhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PushArguments:
    """Flags of ``etu-hf push``."""

    output_dir: str = field(metadata={"help": "The finished run to publish (the output_dir of `etu-hf unlearn`)."})
    repo_id: str = field(metadata={"help": "The hub repo, 'USER/NAME' (created if missing)."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (an existing repo keeps its own)."})
    revision: str | None = field(
        default=None, metadata={"help": "Branch to commit to (created from the default branch if missing)."}
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "Default: 'etu-hf: unlearned model, V_S and audit'."}
    )
    hub_token: str | None = field(
        default=None, metadata={"help": "Hub token with write access. Default: HF_TOKEN, else the `hf auth login` one."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "The base model's hub id for the card (default: from the run's files)."}
    )
    tags: list[str] | None = field(
        default=None, metadata={"help": "Tags added to the card after etu-hf and unlearning.", "action": "extend"}
    )
    dataset: list[str] | None = field(
        default=None,
        metadata={"help": "Dataset names for the card (default: the run's hub corpora).", "action": "extend"},
    )


def cmd(argv: Sequence[str]) -> int:
    """``etu-hf push``: publish a finished run (see :func:`etu_hf.hub.push.push_run`)."""
    from transformers import HfArgumentParser

    from etu_hf.commands.cli import setup_logging
    from etu_hf.hub.push import PushError, push_run

    parser = HfArgumentParser(PushArguments, prog="etu-hf push")
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    setup_logging()
    try:
        url = push_run(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.hub_token,
            base_model=args.base_model,
            tags=args.tags,
            dataset=args.dataset,
        )
    except PushError:
        raise
    except Exception as err:  # HTTP and network errors (an unreachable endpoint): one line, as unlearn --push_to_hub
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PushError(
            f"the upload to {args.repo_id} failed ({type(err).__name__}: {first}); the run in "
            f"{args.output_dir} is unchanged: check the endpoint (HF_ENDPOINT), your connection and token, and push "
            "again."
        ) from err
    print(f"pushed {args.output_dir} to {args.repo_id}: {url}")
    return 0
