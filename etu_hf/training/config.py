"""``ETUTrainingArguments``: ``transformers.TrainingArguments`` plus the ETU settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from etu_hf.artifacts.files import SecretFreeArguments
from etu_hf.artifacts.record import DEFAULT_EPSILON
from etu_hf.ops.tilt import DEFAULT_LAMBDA_MAX
from etu_hf.training.argument_checks import check_training_arguments, require_deepspeed_if_asked
from etu_hf.training.etu_checks import check_epsilon_reachable, check_etu_arguments

__all__ = ["ETUTrainingArguments", "check_epsilon_reachable"]


@dataclass
class ETUTrainingArguments(SecretFreeArguments, TrainingArguments):
    r"""
    Configuration of [`ETUTrainer`]: every field of `transformers.TrainingArguments`, plus the ones
    below. Using [`~transformers.HfArgumentParser`] each field becomes a command-line flag.

    Parameters:
        > Parameters that control the target

        epsilon (`float` or `None`, *optional*, defaults to `None`, which means `0.05`):
            Target mass: the trained model should put at most `epsilon` probability on the forbidden
            set V_S at forget contexts. Must be in (0, 1). Left unset it is 0.05, unless `epsilon_ratio`
            is given (then it stays `None` here and the trainer holds the resolved value).
        epsilon_ratio (`float` or `None`, *optional*, defaults to `None`):
            Set epsilon relative to the base model instead: `epsilon = epsilon_ratio x p_S`, with `p_S` the
            base mass on V_S that the trainer estimates at the start of training (`p_s_sample_size` forget
            sequences). In (0, 1); not together with `epsilon`. The resolved value is
            `ETUTrainer.tilt_state.epsilon`; metrics.json records it with the ratio and that `p_S`
            (`epsilon`, `epsilon_ratio`, `epsilon_base_p_S`), and a resumed run keeps it. An absolute epsilon
            at or above the base mass certifies nothing (the audit's verdict is then "vacuous").
        lambda_mode (`str`, *optional*, defaults to `"per_position"`):
            `"per_position"`: exact tilt per context, `lam(x) = max(0, logit(p(x)) - logit(epsilon))`,
            so the target has `q(S|x) = min(p(x), epsilon)` everywhere (the true I-projection).
            `"global"`: one `lam = logit(p_S) - logit(epsilon)` from the mean base mass `p_S` (one
            number for all contexts; by Jensen the mean target mass is then above `epsilon` when the
            masses differ across contexts).
        lambda_max (`float`, *optional*, defaults to `100.0`):
            `lam` is clamped to `[-lambda_max, lambda_max]`. Must be finite and > 0. The default does
            not bind in normal use; where it binds the target misses epsilon, which is counted
            (`etu/clamped_share`) and warned about above 1% of positions.
        allow_negative_lambda (`bool`, *optional*, defaults to `False`):
            Allow `lam < 0` (amplification: raise the mass on V_S toward `epsilon`).
        lambda_floor (`float`, *optional*, defaults to `0.0`):
            Floor of the tilt in nats: `lam(x) = max(lambda_floor, logit(p(x)) - logit(epsilon))`, so at every
            forget context the odds of S(x) fall by at least `e^lambda_floor`, also where the base mass is already
            below epsilon, and the mass stays capped at epsilon: `q(S|x) = min(epsilon, sigmoid(logit(p(x)) -
            lambda_floor))`, the I-projection onto that tighter constraint. 0 (default) is the plain I-projection
            `q(S|x) = min(p(x), epsilon)`. On SmolLM2 a floor of 4 forgot more of The Beatles and nothing more of
            Harry Potter (BENCHMARKS.md). In `[0, lambda_max)`; not with `allow_negative_lambda`.
        p_s_sample_size (`int`, *optional*, defaults to `512`):
            Number of forget sequences (a seeded random sample of the training data) over which the
            base mass `p_S` is estimated at the start of training.

        > Parameters that control the forbidden set V_S

        vs_method (`str`, *optional*, defaults to `"words"`):
            `"words"`: forbidden *words* (scored forget vs retain by G2 and a log ratio, plus `forbidden_words`),
            forbidden per context: their shared first pieces everywhere, their later pieces only inside the word
            (etu_hf.forbidden_context). `"pmi"` (forget vs retain pointwise mutual information of pieces) or
            `"frequency"`: one set of pieces for every context.
        word_min_g2 (`float`, *optional*, defaults to `10.83`),
        word_min_log_ratio (`float`, *optional*, defaults to `1.0`):
            Words method: keep a word more frequent in the forget text with `G2 >= word_min_g2` (chi2_1
            quantile: 10.83 is p < 0.001, so the threshold scales with corpus size) and smoothed log ratio
            `>= word_min_log_ratio`.
        word_min_share (`float`, *optional*, defaults to `0.5`):
            Words method: a word's first piece is forbidden everywhere only when at least this share of its
            occurrences in the retain text start a forbidden word; otherwise only inside the word.
        word_common_rank (`float`, *optional*, defaults to `0.125`):
            Words method: a scored word whose spaced form is one piece with id below `word_common_rank * |V|` is
            an everyday word and left out (tokenizers list frequent pieces first); 0 keeps every scored word.
        forbidden_words (`str` or `None`, *optional*, defaults to `None`):
            Words method: a UTF-8 file of words to forbid, one per line, merged with the scored words.
        forbid_continuations (`bool` or `None`, *optional*, defaults to `None`),
        continuation_skip_top_k (`int`, *optional*, defaults to `100`):
            Also forbid, at each forget position, the text's own next token when it is informative (for
            knowledge not carried by distinctive words): it holds a letter, is not a special token and is not a
            common word, one of the `continuation_skip_top_k` most frequent retain tokens (without retain data,
            the first `word_common_rank * |V|` ids) standing alone as a word. A word of several pieces is never
            an everyday word, so ` St` + `arr` is capped at ` St` even when ` St` is common (with
            `continuation_per_word=False` a common token is never forbidden). Its certificate is
            on held-out forget text. `forbid_continuations=None`: on when etu-hf builds V_S with
            `vs_method="words"` (the default), off for a V_S you give (`forbidden_set=`,
            `--forbidden_ids_path`) or a piece-level method. A larger list (1000 on SmolLM2) certifies more
            easily but forgets less of a topic; see BENCHMARKS.md.
        continuation_per_word (`bool`, *optional*, defaults to `True`):
            Forbidden continuations: only the first informative piece of each word of the text is forbidden
            (a piece continues a word when it starts with a letter or digit with no space marker and the piece
            before it ends with one). A word's probability is at most its first piece's, so this caps the word;
            the pieces after it are its spelling (`sequ` -> `els`), which the model should keep. `False`:
            every informative piece, as before.
        vs_freq_rate (`float`, *optional*, defaults to `0.01`), vs_abs_cap (`int`, *optional*, defaults to `20000`):
            Frequency method: drop tokens whose forget count exceeds `max(1, min(vs_freq_rate * N, vs_abs_cap))`.
        vocab_top_k (`int` or `None`, *optional*, defaults to `None`):
            Frequency method: keep at most this many of the most frequent remaining tokens.
        pmi_top_k (`int`, *optional*, defaults to `2000`), pmi_min_count (`int`, *optional*, defaults to `20`),
        pmi_smoothing (`float`, *optional*, defaults to `1.0`):
            PMI method: keep tokens seen at least `pmi_min_count` times in the forget data with a
            score above `pmi_min_score`, the `pmi_top_k` best; `pmi_smoothing` is the additive smoothing `a`.
        pmi_min_score (`float`, *optional*, defaults to `1.0`):
            PMI method: minimum score (nats). 1 keeps tokens at least e = 2.7 times as frequent in the
            forget text as in the retain text; 0 admits function words that are only slightly more
            common there, which costs retain quality on real text.
        forbidden_ids_path (`str` or `None`, *optional*, defaults to `None`):
            Use this V_S.ids.json (or a flat JSON list of ids) instead of building V_S.
        span_masking (`bool`, *optional*, defaults to `False`), span_ngram_max (`int`, *optional*, defaults to `3`):
            Add the remaining pieces of forget-corpus words split into 2..`span_ngram_max` pieces whose
            leading piece is in V_S, so that such words are suppressed whole.

        > Parameters that control the loss

        retain_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the retain term. 0 (or no retain data) means suppression-only training.
        retain_loss_type (`str`, *optional*, defaults to `"kl"`):
            `"kl"`: `KL(pi_base || pi_theta)` on retain text, which keeps the model at the base model
            away from the forget topic; `"nll"`: next-token NLL on retain text, which also trains on
            it (on a real-text case it over-fit the retain training documents: held-out retain
            perplexity ratio 1.12 against 1.005 with `"kl"`, see BENCHMARKS.md).
        loss_chunk_size (`int`, *optional*, defaults to `1024`):
            Token positions per chunk of the loss; peak memory holds `loss_chunk_size x |V|` float32
            values instead of `batch x length x |V|`. 0 computes the loss in one piece.
        frozen_on_cpu (`bool`, *optional*, defaults to `False`):
            For models without PEFT adapters: keep the frozen base copy on CPU.

        > Parameters that control the adaptive lambda controller (see `AdaptiveLambdaCallback`)

        adaptive_lambda (`bool`, *optional*, defaults to `True`):
            Add an `AdaptiveLambdaCallback` that measures held-out forget data every
            `lambda_update_freq` steps and moves lambda (global mode) or a lambda offset (per-position
            mode, the same as a per-context target `eps' = sigmoid(logit(epsilon) - offset)`) until
            the sequence-level upper bound of the held-out mass on V_S is at most `epsilon`.
        lambda_update_freq (`int` or `None`, *optional*, defaults to `None`):
            Optimiser steps between controller updates. `None` picks
            `min(25, ceil(max_steps / 8))` from the run's step budget (`TrainerState.max_steps`), so a short
            run still gets about eight updates (40 steps: every 5) and a long one measures every 25 steps.
        lambda_eta (`float`, *optional*, defaults to `1.0`):
            Gain of the controller's step in logit space: `step = lambda_eta * (logit(U) - logit(epsilon)
            + lambda_band / 2)`. 1 closes the gap in one update for a model that follows its target.
        lambda_band (`float`, *optional*, defaults to `0.5`):
            Width, in logit units, of the band below epsilon where the controller holds: it lowers the
            offset only when `logit(U) < logit(epsilon) - lambda_band`.
        lambda_step_max (`float`, *optional*, defaults to `2.0`):
            Largest change of the offset in one update.
        use_upper_for_lambda (`bool`, *optional*, defaults to `True`):
            Decide on the sequence-level upper bound `U` of the held-out mass (the guarantee) instead of
            its point estimate. With fewer than 8 held-out sequences `U` is 1.0 and the point estimate
            decides (a warning says so).
        lambda_min_response (`float`, *optional*, defaults to `0.1`):
            The controller stops raising the offset when the held-out mass no longer follows it: when two
            updates added at least 0.5 nats of offset and the held-out logit fell by less than this much per
            nat added. It holds until the held-out mass falls again (a lagging model) and warns. The gap left
            is generalisation, which a tighter target on the training contexts does not close; it only moves
            the model further from the base. 0: raise while the bound is above `epsilon`.
        stop_when_certified (`int`, *optional*, defaults to `0`):
            Stop training once this many consecutive controller updates found the held-out upper bound
            at most `epsilon` (0: train the whole budget). Fewer steps, less drift on retain text.
        wilson_max_n (`int`, *optional*, defaults to `2048`):
            Cap on `n` of the token-level Wilson figure reported by the audit (labelled as such; it
            treats correlated positions as independent and is never used for a verdict).
        heldout_batches (`int`, *optional*, defaults to `4`):
            Size of the held-out forget slice the controller measures, in training batches of forget
            examples, taken out of the training data with a seeded draw (unless
            `ETUTrainer(heldout_dataset=...)` is given), at most `heldout_max_share` of them.
        heldout_max_share (`float`, *optional*, defaults to `0.25`):
            Cap on the slice that `heldout_batches` asks for: at most `floor(heldout_max_share x n)`
            (and at least one) of the `n` forget examples, so a small forget set keeps three quarters of
            itself for training. 1.0: no cap. Not applied to `heldout_fraction`.
        heldout_fraction (`float` or `None`, *optional*, defaults to `None`):
            When set, the held-out slice is this share of the forget examples instead.

        > Parameters that control the in-loop preference refinement

        preference_weight (`float`, *optional*, defaults to `0.0`):
            Weight of a preference loss added to the ETU loss (0: off).
        pref_format (`str`, *optional*, defaults to `"npo"`):
            `"npo"` (the forget completion against the base model), `"simnpo"` (reference-free,
            length-normalised, margin `pref_margin`) or `"dpo"` (forget completion rejected, a chosen
            completion from `pref_chosen`, same prompt).
        pref_beta (`float`, *optional*, defaults to `0.1`):
            Inverse temperature of the preference loss. Must be > 0.
        pref_every (`int`, *optional*, defaults to `1`):
            Apply the preference loss on optimiser steps that are multiples of this.
        pref_margin (`float`, *optional*, defaults to `0.0`):
            SimNPO's margin gamma.
        pref_prompt_tokens (`int`, *optional*, defaults to `16`):
            The first tokens of each forget example form the prompt x; the rest is the completion y.
        pref_chosen (`str`, *optional*, defaults to `"refusal"`):
            DPO's chosen completion: `"refusal"` (from `pref_refusals`), `"retain"` (the paired retain
            text) or `"data"` (a `pref_chosen_ids` column of token ids in the forget data).
        pref_refusals (`list[str]`):
            Refusals used as chosen completions, cycled over examples.

        > Parameters that control the output

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Replace a previous run in `output_dir`. `ETUTrainer.train` replaces it either way, as
            `Trainer` writes over it, and warns (naming the files) when this is not set; the `etu-hf`
            command line refuses such a folder without it (or `resume_from_checkpoint`). The previous
            run is moved aside and deleted only when the new run succeeds.
    """

    # ----- target
    epsilon: float | None = field(
        default=None,
        metadata={"help": f"Target mass on V_S at forget contexts, in (0, 1) (unset: {DEFAULT_EPSILON})."},
    )
    epsilon_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Target mass as a share of the base model's: epsilon = r x p_S, the base mass on V_S estimated "
            "at the start of training; r in (0, 1), e.g. 0.25. Not with --epsilon."
        },
    )
    lambda_mode: str = field(
        default="per_position",
        metadata={
            "help": "'per_position' (exact tilt per context, recommended) or 'global' (one lambda from mean p_S).",
            "choices": ["per_position", "global"],
        },
    )
    lambda_max: float = field(
        default=DEFAULT_LAMBDA_MAX, metadata={"help": "Clamp lambda to [-lambda_max, lambda_max]; finite, > 0."}
    )
    allow_negative_lambda: bool = field(
        default=False, metadata={"help": "Allow lambda < 0 (amplification of the mass on V_S)."}
    )
    lambda_floor: float = field(
        default=0.0,
        metadata={
            "help": "Floor of lambda in nats: at every forget context the odds of S(x) fall by at least e^lambda_floor "
            "(also where the base is below epsilon); 0 (default): the plain I-projection, q(S|x) = min(p(x), epsilon)."
        },
    )
    p_s_sample_size: int = field(
        default=512, metadata={"help": "Forget sequences sampled to estimate the base mass p_S at the start."}
    )
    # ----- forbidden set
    vs_method: str = field(
        default="words",
        metadata={
            "help": "How V_S is built: 'words' (forbidden words, per-context pieces), 'pmi' or 'frequency' (pieces).",
            "choices": ["words", "pmi", "frequency"],
        },
    )
    word_min_g2: float = field(
        default=10.83,
        metadata={
            "help": "Words method: minimum G2 (log-likelihood ratio) of forget vs retain counts; 10.83: p<0.001."
        },
    )
    word_min_log_ratio: float = field(
        default=1.0, metadata={"help": "Words method: minimum smoothed log ratio of forget vs retain rate, in nats."}
    )
    word_min_share: float = field(
        default=0.5,
        metadata={
            "help": "Words method: a word's first piece is forbidden everywhere only if at least this share of its "
            "retain occurrences start a forbidden word (else only its later pieces, inside the word)."
        },
    )
    word_common_rank: float = field(
        default=0.125,
        metadata={
            "help": "Words method: leave out everyday words: one-piece words among the first word_common_rank x |V| "
            "ids of the tokenizer (0: keep them)."
        },
    )
    forbidden_words: str | None = field(
        default=None,
        metadata={"help": "Words method: a text file of words to forbid (one per line), merged with the scored ones."},
    )
    forbid_continuations: bool | None = field(
        default=None,
        metadata={
            "help": "Also forbid the forget text's own next token where it is informative (a letter, not a common "
            "word: see continuation_skip_top_k). Default: on when V_S is built with "
            "vs_method 'words', off for a given V_S or a piece-level method."
        },
    )
    continuation_skip_top_k: int = field(
        default=100,
        metadata={
            "help": "Forbidden continuations: never forbid the K most frequent tokens of the retain text where one "
            "makes a word alone (a word of several pieces is never an everyday word); with "
            "continuation_per_word false, never forbid them at all."
        },
    )
    continuation_per_word: bool = field(
        default=True,
        metadata={
            "help": "Forbidden continuations: forbid only the first informative piece of each word of the forget "
            "text (caps the word; its later pieces are spelling, not knowledge). False: every informative piece."
        },
    )
    vs_freq_rate: float = field(default=0.01, metadata={"help": "Frequency method: drop tokens above this share of N."})
    vs_abs_cap: int = field(default=20000, metadata={"help": "Frequency method: absolute count cap."})
    vocab_top_k: int | None = field(default=None, metadata={"help": "Frequency method: keep the K most frequent."})
    pmi_top_k: int = field(default=2000, metadata={"help": "PMI method: keep the K best-scoring tokens."})
    pmi_min_count: int = field(default=20, metadata={"help": "PMI method: minimum forget count of a token."})
    pmi_min_score: float = field(
        default=1.0, metadata={"help": "PMI method: minimum score in nats (1: >= e times as frequent as in retain)."}
    )
    pmi_smoothing: float = field(default=1.0, metadata={"help": "PMI method: additive smoothing a > 0."})
    forbidden_ids_path: str | None = field(
        default=None, metadata={"help": "Load V_S from this V_S.ids.json (or flat JSON list) instead of building it."}
    )
    span_masking: bool = field(
        default=False,
        metadata={"help": "Add the other pieces of multi-piece forget words whose first piece is in V_S."},
    )
    span_ngram_max: int = field(default=3, metadata={"help": "Span masking: longest word (in pieces) to extend."})
    # ----- loss
    retain_weight: float = field(default=1.0, metadata={"help": "Weight of the retain term (0: suppression only)."})
    retain_loss_type: str = field(
        default="kl",
        metadata={
            "help": "Retain term: 'kl' (KL(base || model): stay at the base model) or 'nll' (train on retain text).",
            "choices": ["nll", "kl"],
        },
    )
    loss_chunk_size: int = field(
        default=1024, metadata={"help": "Token positions per loss chunk (bounds memory); 0 = unchunked."}
    )
    frozen_on_cpu: bool = field(
        default=False, metadata={"help": "Keep the frozen base model copy on CPU (models without PEFT adapters)."}
    )
    # ----- adaptive lambda
    adaptive_lambda: bool = field(
        default=True, metadata={"help": "Adapt lambda during training from held-out forget data (controller)."}
    )
    lambda_update_freq: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps between lambda updates (default: min(25, ceil(max_steps / 8)))."},
    )
    lambda_eta: float = field(
        default=1.0, metadata={"help": "Gain of the offset step in logit space (1: one update for a model on target)."}
    )
    lambda_band: float = field(
        default=0.5, metadata={"help": "Hold band below epsilon, in logit units; lower only below it."}
    )
    lambda_step_max: float = field(default=2.0, metadata={"help": "Largest change of the offset per update."})
    use_upper_for_lambda: bool = field(
        default=True, metadata={"help": "Decide on the sequence-level upper bound of the held-out mass."}
    )
    lambda_min_response: float = field(
        default=0.1,
        metadata={
            "help": "Stop raising the offset when the held-out logit falls by less than this per nat of offset "
            "added over two updates (0: never stop)."
        },
    )
    stop_when_certified: int = field(
        default=0,
        metadata={
            "help": "Stop training after this many consecutive controller updates whose held-out upper bound is "
            "<= epsilon (0: train the whole budget)."
        },
    )
    wilson_max_n: int = field(default=2048, metadata={"help": "Cap on n of the audit's token-level Wilson figure."})
    heldout_batches: int = field(
        default=4, metadata={"help": "Training batches of forget data held out for the controller."}
    )
    heldout_max_share: float = field(
        default=0.25,
        metadata={"help": "The slice heldout_batches asks for is at most this share of the forget data (1: no cap)."},
    )
    heldout_fraction: float | None = field(
        default=None, metadata={"help": "Share of forget data held out for the controller (overrides heldout_batches)."}
    )
    # ----- in-loop preference refinement
    preference_weight: float = field(default=0.0, metadata={"help": "Weight of the preference loss (0: off)."})
    pref_format: str = field(
        default="npo", metadata={"help": "'npo', 'simnpo' or 'dpo'.", "choices": ["npo", "simnpo", "dpo"]}
    )
    pref_beta: float = field(default=0.1, metadata={"help": "Inverse temperature of the preference loss (> 0)."})
    pref_every: int = field(default=1, metadata={"help": "Apply it every N optimiser steps."})
    pref_margin: float = field(default=0.0, metadata={"help": "SimNPO margin gamma."})
    pref_prompt_tokens: int = field(
        default=16, metadata={"help": "Leading tokens of a forget example used as the prompt x."}
    )
    pref_chosen: str = field(
        default="refusal",
        metadata={
            "help": "DPO chosen completion: 'refusal', 'retain' or 'data' (pref_chosen_ids column).",
            "choices": ["refusal", "retain", "data"],
        },
    )
    pref_refusals: list[str] = field(
        default_factory=lambda: [" I can't help with that.", " Sorry, I won't share that.", " I don't know."],
        metadata={"help": "Refusals used as DPO chosen completions."},
    )
    # ----- output
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a previous run in output_dir (`etu-hf unlearn` refuses one without this flag)."},
    )

    def __post_init__(self) -> None:
        check_training_arguments(self)
        check_etu_arguments(self)
        require_deepspeed_if_asked(self.deepspeed)
        super().__post_init__()
