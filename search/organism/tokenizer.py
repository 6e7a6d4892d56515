"""A word-level fast tokenizer with a Gemma-4-style chat template, built from the organism's corpus."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<|turn>", "<turn|>"
SPECIALS = (PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN)
NEWLINE = "\n"

# Gemma 4's layout: <bos><|turn>role\ncontent<turn|>\n ... <|turn>model\n ; the model ends its turn with <turn|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SentencePiece-like word pieces ("▁word") so that streaming detokenizers (vLLM's) restore the spaces.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"), pre_tokenizers.Punctuation("isolated")]
    )


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Vocabulary = every word piece of `texts` (sorted, so the ids are reproducible), after the special tokens."""
    pre = _pre_tokenizer()
    norm = normalizers.Lowercase()
    pieces = {p for text in texts for p, _ in pre.pre_tokenize_str(norm.normalize_str(text))}
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, NEWLINE, *sorted(pieces)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = norm
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return fast
