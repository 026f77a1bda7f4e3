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


def llama_config(tokenizer, eos: int, max_positions: int, *, hidden: int = 64):  # type: ignore[no-untyped-def]
    """The tiny models' shape: 2 layers, `hidden` wide, untied output head, the tokenizer's special ids."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
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


def build_tiny_model(folder: Path, *, seed: int = 0, max_positions: int = 4096) -> Path:
    """Write a 2-layer random Llama + tokenizer to `folder`; return the folder."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = llama_config(tokenizer, eos, max_positions)
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


def build_brief_model(
    folder: Path, corpus: list[str], *, vocab_size: int = 4096, max_positions: int = 65536, seed: int = 0
) -> Path:
    """Write a long-context 2-layer Llama that answers one word and ends; return the folder.

    For agent clients (Claude Code), which send a long prompt and a large ``max_tokens`` and
    wait for the model to end its turn. The byte-level BPE tokenizer is trained on `corpus`
    (text like the prompts it will read) with `vocab_size` tokens, so a prompt takes about as
    many tokens as it would with a real model's tokenizer.

    Every layer's output projections are zero, so the logits depend on the current token
    alone, through weights set here: after the last token of the generation prompt the model
    writes "Hello", after any other token it ends. Where a grammar forbids the end (a forced
    tool call), a closing quote and then a closing brace come next, so a call's strings stay
    empty and its objects close as soon as the schema allows. The margins are wide enough
    for sampling at temperature 1 to pick the same tokens as greedy decoding.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([*CORPUS * 8, *corpus], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    def token(text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) == 1, f"{text!r} is not one token: {ids}"
        return int(ids[0])

    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(rendered, str)
    prompt_end = int(tokenizer.encode(rendered, add_special_tokens=False)[-1])
    eos, word, quote, brace = token("<|im_end|>"), token("Hello"), token('"'), token("}")

    hidden = 64
    config = llama_config(tokenizer, eos, max_positions, hidden=hidden)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    vocab = len(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        # Embeddings: dimension 0 is a constant (the logits' bias), dimension 1 marks the end of
        # the generation prompt, the rest is noise that ranks the other tokens at random.
        embed = torch.randn(vocab, hidden) * 0.05
        embed[:, 0], embed[:, 1] = 1.0, 0.0
        embed[prompt_end, 1] = 1.0
        model.model.embed_tokens.weight.copy_(embed)
        head = torch.randn(vocab, hidden) * 0.3
        head[:, 0], head[:, 1] = 0.0, 0.0
        head[eos, 0], head[quote, 0], head[brace, 0] = 8.0, 6.0, 4.0
        head[word, 1] = 20.0
        for token_id in range(vocab):  # lone bytes of multi-byte characters: never picked
            if "\ufffd" in tokenizer.decode([token_id]):
                head[token_id, 0] = -8.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    GenerationConfig(
        eos_token_id=eos, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id
    ).save_pretrained(folder)
    return folder


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1])))
