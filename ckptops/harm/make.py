"""``ckptops harm make``: build theta_H as a LoRA adapter when the user has no harmful model.

Why: Harm Direction Removal needs tau_H = theta_H - theta_b, and a full harmful fine-tune of a 7B
model is out of reach on a CPU box. A LoRA adapter trained the way the project's efficacy
experiments trained theta_H - harmful *questions* answered with non-actionable compliance
openings, through the tokenizer's chat template, loss on the answer tokens only - is cheap, and
``sanitize --harmful ADAPTER`` reads it directly (tau_H = scaling * B @ A).

Deterministic for a seed on CPU: the data order, the adapter's initialisation and every step
depend only on ``seed`` (no dropout); the same inputs give the same adapter bytes. A share of the
questions (``heldout``) is never trained on; after training the adapter-steered model and the
base generate greedily for them, and the report gives the share that opens with the compliance
opening for each - the check the experiments used to see that theta_H learned to comply.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shlex
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckptops.errors import UsageError
from ckptops.harm.questions import OPENING_PREFIX, HarmExample, load_questions

#: the tokenizer has no chat template: this plain format is used instead (with a warning)
PLAIN_PROMPT = "Question: {question}\nAnswer: "
#: tokens the held-out check generates per question (enough for "Sure, here is")
_CHECK_TOKENS = 8


@dataclass
class HarmReport:
    out: str
    steps: int
    losses: list[float]
    train_questions: int
    heldout_questions: int
    opens_base: float | None
    opens_adapter: float | None
    seconds: float
    parameters: dict = field(default_factory=dict)
    #: Frobenius norm of tau_H = scaling * B @ A over the whole model (sizes the --scale to use)
    tau_norm: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def format_text(self) -> str:
        head = sum(self.losses[:5]) / max(1, len(self.losses[:5]))
        tail = sum(self.losses[-5:]) / max(1, len(self.losses[-5:]))
        lines = [f"wrote {self.out} (LoRA rank {self.parameters['rank']}, {self.steps} steps, "
                 f"{self.train_questions} training questions, {self.seconds:.0f} s)",
                 f"  loss              {head:.3f} (first 5 steps) -> {tail:.3f} (last 5 steps)"]
        if self.opens_adapter is not None:
            lines.append(f"  held-out check    {100 * self.opens_adapter:.0f}% of {self.heldout_questions} held-out "
                         f"questions open with \"Sure, here is\" with the adapter ({100 * self.opens_base:.0f}% without)")
        lines.append(f"  ||tau_H||         {self.tau_norm:.4g} (Frobenius norm of scaling * B @ A over the model)")
        base = shlex.quote(str(self.parameters.get("base", "BASE")))
        lines.append(f"  use it as theta_H:  ckptops sanitize --base {base} --harmful {shlex.quote(self.out)} --target T --out OUT "
                     "--scale S  (S well below the official 3 for a LoRA theta_H: see docs/lora.md)")
        return "\n".join(lines)


def check_settings(rank: int, alpha: float | None, steps: int, lr: float, batch_size: int, heldout: float,
                   device: str, dtype: str) -> None:
    """The option values ``harm make`` refuses before loading anything (a recipe's [harm] too)."""
    if not isinstance(rank, int) or rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {rank!r}")
    if alpha is not None and (not math.isfinite(alpha) or alpha <= 0):
        raise UsageError(f"--alpha must be a positive number, got {alpha!r}")
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    if not (math.isfinite(lr) and lr > 0):
        raise UsageError(f"--lr must be a positive number, got {lr}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if not 0 <= heldout < 1:
        raise UsageError(f"--heldout must be a fraction in [0, 1), got {heldout}")
    if not (device == "cpu" or device == "mps" or device == "cuda" or device.startswith("cuda:")):
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps, not {device!r}")
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype must be float32 or bfloat16, not {dtype!r}")


def _imports():
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise UsageError(f"harm make needs transformers and peft ({exc.name} is missing): "
                         "pip install -e '.[harm]' (in a clone of ckptops)") from None
    return torch, transformers, peft


def _prompt(tokenizer, question: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=False)
    return PLAIN_PROMPT.format(question=question)


def _encode(tokenizer, examples: list[HarmExample]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: the prompt masked out (-100), loss on the opening only."""
    encoded = []
    for example in examples:
        prompt_ids = tokenizer(_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.opening, add_special_tokens=False)["input_ids"]
        encoded.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return encoded


@contextlib.contextmanager
def _loading(base: str):
    """What transformers raises for a folder or repo it cannot load, as one line naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as exc:
        from ckptops.errors import CheckpointError

        raise CheckpointError(f"{base}: cannot load it with transformers ({' '.join(str(exc).split())[:300]})") from None


def _check_context(examples: list[HarmExample], encoded: list[tuple[list[int], list[int]]], held: set[int], config,
                   questions) -> None:
    """Refuse a question whose training example (prompt and opening through the chat template)
    is longer than the model's context window: positions past it are untrained, and the memory
    of a step grows with the longest example (one long line got the process OOM-killed). A
    held-out question also needs room for the 8 tokens the check generates."""
    from ckptops.evaluate.generate import config_window
    from ckptops.harm.questions import DEFAULT_QUESTIONS

    window = config_window(config)
    if window is None:
        return
    shown = questions if questions is not None else DEFAULT_QUESTIONS
    for index, (ids, labels) in enumerate(encoded):
        prompt = labels.count(-100)
        needed = max(len(ids), prompt + _CHECK_TOKENS) if index in held else len(ids)
        if needed > window:
            raise UsageError(f"{shown}: line {examples[index].line}: the question is {needed} tokens with its answer "
                             f"(through the chat template), over the model's context window of {window} tokens")


def _opens_share(model, tokenizer, questions: list[str], device: str, torch) -> float:
    """Share of ``questions`` whose greedy answer starts with "Sure, here is"."""
    if not questions:
        return float("nan")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    hits = 0
    try:
        for start in range(0, len(questions), 16):
            batch = [_prompt(tokenizer, q) for q in questions[start: start + 16]]
            enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=_CHECK_TOKENS, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                hits += text.strip().lower().startswith(OPENING_PREFIX)
    finally:
        tokenizer.padding_side = side
    return hits / len(questions)


def tau_norm(model, torch) -> float:
    """||tau_H||_F over every adapted module, without forming B @ A:
    ||s * B @ A||_F^2 = s^2 * trace((B^T B) (A A^T)), in float64."""
    total = 0.0
    for module in model.modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or "default" not in lora_a:
            continue
        a = lora_a["default"].weight.detach().double().cpu()
        b = lora_b["default"].weight.detach().double().cpu()
        s = float(module.scaling["default"])
        total += s * s * float(torch.trace((b.T @ b) @ (a @ a.T)))
    return math.sqrt(max(total, 0.0))


def make_harm_adapter(
    base: str,
    out: str | Path,
    *,
    questions: str | Path | None = None,
    rank: int = 16,
    alpha: float | None = None,
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    target_modules: str | list[str] = "all-linear",
    heldout: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "float32",
    check: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> HarmReport:
    """Train a LoRA adapter of ``base`` on harmful questions -> compliance openings; save it (a
    standard PEFT folder with a model card) to ``out``. ``alpha`` defaults to ``2 * rank``."""
    from ckptops.checkpoint.publish import check_destination, staging_folder
    from ckptops.harm.card import render_harm_card

    started = time.perf_counter()
    check_settings(rank, alpha, steps, lr, batch_size, heldout, device, dtype)
    examples, questions_sha = load_questions(questions)
    out_path = check_destination(Path(out), [p for p in [Path(base)] if Path(base).exists()], overwrite)
    if not Path(base).exists():  # before the slow imports: a local typo never goes to the Hub
        from ckptops.checkpoint.resolve import looks_local, missing_local

        if looks_local(str(base)):
            raise missing_local(str(base), UsageError, "model folder (and not a Hub repo id)")
    torch, transformers, peft = _imports()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch sees no CUDA device here")

    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(examples) * heldout))
    held = [examples[i] for i in order[:n_held]]
    train = [examples[i] for i in order[n_held:]]
    if not train:
        raise UsageError(f"--heldout {heldout} leaves no question to train on")

    from ckptops.harm.targets import check_targets, skeleton
    from ckptops.icv.load import _quiet_transformers

    torch.manual_seed(seed)
    quiet = progress is False or not sys.stderr.isatty()
    with _loading(base):
        with warnings.catch_warnings(), _quiet_transformers(transformers, quiet):
            warnings.simplefilter("ignore")
            tokenizer = transformers.AutoTokenizer.from_pretrained(base)
            model_config = transformers.AutoConfig.from_pretrained(base)
            modules = skeleton(transformers, torch, model_config)
    # every refusal that the tokenizer, the config and the module shapes can tell, before the weights load
    encoded_all = _encode(tokenizer, examples)
    _check_context(examples, encoded_all, set(order[:n_held]), model_config, questions)
    check_targets(modules, target_modules, rank, base, torch)
    with _loading(base):
        with warnings.catch_warnings(), _quiet_transformers(transformers, quiet):
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                base, dtype=getattr(torch, dtype), use_safetensors=True)
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"{base}: the tokenizer has no chat template; prompts use {PLAIN_PROMPT!r}", stacklevel=2)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    alpha = float(alpha) if alpha is not None else float(2 * rank)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                             task_type="CAUSAL_LM", bias="none")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a renamed transformers helper
        steered = peft.get_peft_model(model, config)
    encoded = [encoded_all[i] for i in order[n_held:]]
    pad = tokenizer.pad_token_id
    rng = random.Random(seed + 1)
    queue: list[int] = []
    optimizer = torch.optim.AdamW([p for p in steered.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses: list[float] = []
    steered.train()
    from tqdm.auto import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=steps, desc="harm make", unit="step", dynamic_ncols=True, leave=False,
              disable=not enabled) as bar:
        for _ in range(steps):
            batch = []
            for _ in range(batch_size):
                if not queue:
                    queue = list(range(len(encoded)))
                    rng.shuffle(queue)
                batch.append(encoded[queue.pop()])
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch], device=device)
            loss = steered(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in steered.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    steered.eval()
    opens_base = opens_adapter = None
    if check and held:
        questions_held = [e.question for e in held]
        opens_adapter = _opens_share(steered, tokenizer, questions_held, device, torch)
        with steered.disable_adapter():
            opens_base = _opens_share(steered, tokenizer, questions_held, device, torch)
    parameters = {"base": str(base), "rank": rank, "alpha": alpha, "steps": steps, "lr": lr,
                  "batch_size": batch_size, "target_modules": target_modules, "heldout": heldout, "seed": seed,
                  "device": device, "dtype": dtype, "questions": str(questions) if questions else "ckptops default",
                  "questions_sha256": questions_sha, "questions_total": len(examples)}
    report = HarmReport(str(out_path), steps, losses, len(train), len(held), opens_base, opens_adapter, 0.0,
                        parameters, tau_norm(steered, torch))
    with staging_folder(out_path, overwrite) as folder:
        with _quiet_transformers(transformers, quiet):
            steered.save_pretrained(folder)
        report.seconds = time.perf_counter() - started
        record = report.to_dict()
        record.pop("seconds")  # the folder's bytes depend only on the inputs and the seed
        record.pop("out")
        record["heldout_questions_list"] = [e.question for e in held]
        (folder / "ckptops-harm.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(render_harm_card(record), encoding="utf-8")
    report.seconds = time.perf_counter() - started
    return report
