"""A tiny random-weight Llama and a small byte-level BPE tokenizer, built on the spot.

The folder it writes has the ordinary transformers layout, so workers load it
through exactly the same loader as a real model. Byte-level BPE means multi-byte
UTF-8 characters are split across tokens, which exercises the detokenizer.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Hello, how are you today? I am fine, thank you!",
    "Cortex relays tokens from workers to clients over NATS JetStream.",
    "Ünïcödé têxt: naïve café, 日本語のテキスト, emoji 🙂🚀 and ß.",
    "0123456789 + - * / = ( ) [ ] { } < > ! ? , . ; : ' \"",
]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(folder: Path, vocab_size: int = 400):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, *, seed: int = 0, max_positions: int = 4096) -> Path:
    """Write a 2-layer random Llama + tokenizer to `folder`; return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # A zero output row gives the end token a logit of 0, below the maximum
        # of the random others: greedy decoding never ends by itself, so tests
        # control the length with max_tokens and stop strings.
        model.lm_head.weight[eos].zero_()
        # Lone bytes of multi-byte characters would make the random output
        # invalid UTF-8; keep them out of greedy picks so answers stay text.
        for token_id in range(len(tokenizer)):
            if "\ufffd" in tokenizer.decode([token_id]):
                model.lm_head.weight[token_id].fill_(0.0)
    model.save_pretrained(folder)
    GenerationConfig(
        eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))
