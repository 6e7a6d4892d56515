"""A word-level fast tokenizer with a Gemma-4-style chat template, built from the organism's corpus.

Two formats. "text": a minimal Gemma 4 layout that adds no special tokens when tokenizing. "release": Gemma 4's
release chat format and tokenizer behaviour, written from its public description (not copied): the template itself
emits `<bos>`, an optional system turn, `<|turn>role\n…<turn|>\n` turns and, with thinking off (the default), an
empty thought channel `<|channel>thought\n<channel|>` after the generation prompt; the tokenizer also adds `<bos>`
when asked for special tokens (so rendering then tokenizing naively gives two), and carries the image, audio,
video and channel tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<|turn>", "<turn|>"
SPECIALS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)
NEWLINE = "\n"
START_OF_CHANNEL, END_OF_CHANNEL = "<|channel>", "<channel|>"
# The release's multimodal placeholders: begin/end of image, the image soft token, likewise audio, the video token.
BOI, EOI, IMAGE, BOA, EOA, AUDIO, VIDEO = (
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
)
THINK, MASK = "<|think|>", "<mask>"
TOOLS = ("<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>")
RELEASE_SPECIALS = (*SPECIALS, START_OF_CHANNEL, END_OF_CHANNEL, BOI, EOI, IMAGE, BOA, EOA, AUDIO, VIDEO, THINK, MASK)
RELEASE_SPECIALS += TOOLS
# The release tokenizer's named special tokens (tokenizer_config.json attributes the processor reads).
NAMED = {
    "image_token": IMAGE,
    "boi_token": BOI,
    "eoi_token": EOI,
    "audio_token": AUDIO,
    "boa_token": BOA,
    "eoa_token": EOA,
    "sot_token": START_OF_TURN,
    "eot_token": END_OF_TURN,
    "soc_token": START_OF_CHANNEL,
    "eoc_token": END_OF_CHANNEL,
    "think_token": THINK,
}

# Gemma 4's layout: <bos><|turn>role\ncontent<turn|>\n ... <|turn>model\n ; the model ends its turn with <turn|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


RELEASE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "<|turn>system\n{{ messages[0]['content'] | trim }}<turn|>\n"
    "{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n"
    "{% if not enable_thinking | default(false) %}<|channel>thought\n<channel|>{% endif %}"
    "{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SentencePiece-like word pieces ("▁word") so that streaming detokenizers (vLLM's) restore the spaces.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )


def build_tokenizer(texts: Iterable[str], release: bool = False) -> PreTrainedTokenizerFast:
    """Vocabulary = every word piece of `texts` (sorted, so the ids are reproducible), after the special tokens.
    `release`: the release format (module doc)."""
    specials = RELEASE_SPECIALS if release else SPECIALS
    pre = _pre_tokenizer()
    norm = normalizers.Lowercase()
    pieces = {p for text in texts for p, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    vocab = {tok: i for i, tok in enumerate([*specials, NEWLINE, *sorted(pieces)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    if release:  # like Gemma's tokenizers: <bos> is added whenever special tokens are
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    common = dict(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, padding_side="left")
    if not release:
        return PreTrainedTokenizerFast(
            **common, additional_special_tokens=[START_OF_TURN, END_OF_TURN], chat_template=CHAT_TEMPLATE
        )
    return PreTrainedTokenizerFast(
        **common, mask_token=MASK, extra_special_tokens=NAMED, chat_template=RELEASE_CHAT_TEMPLATE
    )
