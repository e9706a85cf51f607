"""A small byte-level BPE tokenizer built offline, so that the demo's generated models run with
every command (``generate``, ``icv compute``, ``eval``, ``run``), not only ``sanitize``.

The tokenizer is trained in memory with ``tokenizers`` on a few kilobytes of fixed English text
(the shipped ICV demonstration pairs plus a short word list), so it is deterministic and needs no
download. Byte-level pre-tokenization means any text, in any script, encodes without unknown
tokens. It is saved as ``tokenizer.json`` + ``tokenizer_config.json`` with a chat template, the
two files transformers' ``AutoTokenizer`` reads. The models' weights are random: generations are
noise; the point is that the commands run end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

#: ids 0, 1, 2 match the generated config's bos_token_id 1 and eos_token_id 2
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_EXTRA_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sure, here is how to do that: Step 1: "
    "I cannot help with that request because it could cause harm. Hello, world! "
    "What is the capital of France? Paris is the capital of France. 0 1 2 3 4 5 6 7 8 9"
)


def _corpus() -> list[str]:
    from ckptops.icv.demos import default_demos_path

    lines = [_EXTRA_TEXT]
    for line in default_demos_path().read_text(encoding="utf-8").splitlines():
        if line.strip():
            lines.extend(str(v) for v in json.loads(line).values())
    return lines


def available() -> bool:
    """Whether the ``tokenizers`` package (installed with the ``[icv]`` extra) is here."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def write_tokenizer(folder: str | Path, vocab_size: int) -> list[str]:
    """Train the tokenizer (at most ``vocab_size`` tokens, the model's embedding rows) and write it
    into ``folder``; returns the file names written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder = Path(folder)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    if tokenizer.get_vocab_size() > vocab_size:  # the byte alphabet alone is 256 + specials
        raise ValueError(f"a {vocab_size}-token vocabulary is too small for a byte-level tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}, indent=2) + "\n",
        encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
