"""A tokenizer and a small decoder-only model built locally: nothing is downloaded.

The tokenizer is a byte-level BPE trained on an in-memory corpus of arithmetic text, with the
special tokens a chat model has; the model is a randomly initialised Qwen2 of a chosen size. Both
save with `save_pretrained`, so every path in ptlab that loads a Hugging Face model by path
(`AutoTokenizer.from_pretrained`, `AutoModelForCausalLM.from_pretrained`) loads them unchanged.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL = {"unk": "<unk>", "pad": "<pad>", "bos": "<|im_start|>", "end": "<|im_end|>", "eos": "<|endoftext|>"}
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """Text the BPE merges are learned from: digits, operators, and the answer format."""
    lines = []
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.")
            lines.append(f"Compute {a} * {b} - {b}. Step: {a} * {b} = {a * b}; then {a * b} - {b} = {a * b - b}.")
    lines.append("user assistant system Solve the problem. Think step by step. Final answer:")
    return lines


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer wrapped as a `transformers` fast tokenizer, with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    # The same normaliser and pre-tokeniser as transformers' Qwen2Tokenizer, which is what
    # `AutoTokenizer.from_pretrained` builds for a folder whose config says qwen2: the tokenizer in memory
    # and the one reloaded from disk then split text identically (digits one by one).
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL["unk"], pad_token=SPECIAL["pad"],
                                   eos_token=SPECIAL["eos"], bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
               intermediate_size: int = 128, max_positions: int = 256, seed: int = 0, tie_embeddings: bool = True):
    """A randomly initialised Qwen2 causal LM sized for CPU tests (about 60k parameters by default)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                      max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=tie_embeddings)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_tiny_model(path: str | Path, seed: int = 0, **size) -> Path:
    """Build the tokenizer and a random model and save both to `path` (a Hugging Face model folder)."""
    path = Path(path)
    tok = make_tokenizer()
    model = make_model(tok, seed=seed, **size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(path)
    model.save_pretrained(path)
    return path
