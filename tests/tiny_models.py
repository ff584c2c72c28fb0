"""Tiny, randomly initialised encoders of every architecture strata supports, built in seconds
with transformers' own config and tokenizer classes and saved with `save_pretrained`: 4 layers,
hidden size 32, a vocabulary trained here on the sample corpus, positions for 64 tokens.

Each folder is what a user's model folder of that architecture looks like to strata: config.json
with the class's own defaults (final norms, attention layouts, position schemes), the weights,
and the tokenizer class transformers uses for it (so `AutoTokenizer` rebuilds it as it would a
real one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from conftest import CORPUS, DATA

LIMIT = 64  # tokens a sequence may hold, special tokens included, in every tiny model
VOCAB = 600
SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, embedding_size=16,
             num_key_value_heads=4, head_dim=8, dim=32, n_layers=4, n_heads=4, hidden_dim=64)


@dataclass(frozen=True)
class Tiny:
    """One architecture: its model_type, the tokenizer it is saved with, and config.json changes."""

    model_type: str
    tokenizer: str  # a key of TOKENIZERS
    config: dict = field(default_factory=dict)
    reserved: bool = False  # its position table reserves pad_token_id + 1 positions before the first token
    early_exit: bool = True  # False: a cut model's layer outputs are not its hidden states, so it runs whole
    leaks_padding: bool = False  # padded positions reach the real ones: micro-batches of one length only

    @property
    def name(self) -> str:
        return self.model_type + ("-typed" if self.tokenizer == "wordpiece-typed" else "")


# padding_idx-based positions (RoBERTa's kin) reserve pad_token_id + 1 positions: the tokenizers
# below put <pad> at id 1, as RoBERTa's does
ARCHITECTURES = [
    Tiny("bert", "wordpiece"),
    Tiny("bert", "wordpiece-typed"),  # a template that gives [SEP] token type 1: token_type_ids must reach the model
    Tiny("distilbert", "wordpiece"),
    Tiny("electra", "wordpiece"),
    Tiny("ernie", "wordpiece"),
    Tiny("nomic_bert", "wordpiece"),
    Tiny("roberta", "bytebpe", reserved=True),
    Tiny("data2vec-text", "bytebpe", reserved=True),
    Tiny("roberta-prelayernorm", "bytebpe", reserved=True),
    Tiny("xlm-roberta", "xlmr", reserved=True),
    Tiny("camembert", "camembert", reserved=True),
    Tiny("xlm-roberta-xl", "xlmr", reserved=True),
    Tiny("mpnet", "mpnet", reserved=True),
    Tiny("albert", "albert"),
    Tiny("deberta", "deberta"),
    Tiny("deberta-v2", "deberta-v2", {"relative_attention": True, "position_biased_input": False,
                                      "pos_att_type": ["p2c", "c2p"], "max_relative_positions": -1,
                                      "position_buckets": 16, "norm_rel_ebd": "layer_norm", "share_att_key": True}),
    Tiny("gte", "xlmr"),
    Tiny("modernbert", "cls-sep-bpe", {"global_attn_every_n_layers": 2, "local_attention": 8}),
    Tiny("eurobert", "bos-eos-bpe"),
    # more of what transformers loads as a masked-language-model encoder
    Tiny("ibert", "bytebpe", reserved=True),  # its position table is a QuantEmbedding, not an nn.Embedding
    Tiny("megatron-bert", "wordpiece"),  # a final LayerNorm inside the encoder
    # its trigram input embeddings join each token with its neighbours: the last real one sees padding
    Tiny("mobilebert", "wordpiece", {"true_hidden_size": 32, "intra_bottleneck_size": 32, "embedding_size": 16},
         leaks_padding=True),
    Tiny("roformer", "wordpiece"),
    # calls its pooler whatever it is; its layers return (B, D, T): the replica's check keeps it whole
    Tiny("squeezebert", "wordpiece", {"embedding_size": 32}, early_exit=False),
    # padding reaches the real positions (a convolution, a Fourier transform, hashing): equal-length batches
    Tiny("convbert", "wordpiece", leaks_padding=True),
    Tiny("fnet", "albert", leaks_padding=True),
    Tiny("yoso", "albert", leaks_padding=True),
]


def corpus_texts() -> list[str]:
    with open(CORPUS / "part-0.jsonl") as f:
        return [json.loads(line)["text"] for line in f]


VOCABULARIES = DATA / "tiny-vocab"  # trained once on the sample corpus by train_vocabularies()


@lru_cache(maxsize=None)
def _trained(kind: str) -> dict:
    """A `tokenizers` model of about VOCAB entries, trained on the sample corpus: read from
    tests/data/tiny-vocab, because the Unigram and WordPiece trainers give another vocabulary in
    every process (and only some vocabularies hold the Unigram ties that test_architectures checks)."""
    return json.loads((VOCABULARIES / f"{kind.replace(' ', '-')}.json").read_text())


def train_vocabularies() -> None:
    """Write tests/data/tiny-vocab anew (kept as long as it holds Unigram ties that tokenizers and
    transformers break apart: see test_unigram_ties_break_as_autotokenizer_breaks_them)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.implementations import BertWordPieceTokenizer, ByteLevelBPETokenizer

    texts = corpus_texts()
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(texts, vocab_size=VOCAB, show_progress=False, unk_token="<unk>",
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]", "[MASK]",
                                                "[PAD]", "[UNK]"])
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]", "[MASK]", "[PAD]",
                                            "[UNK]", "<|begin_of_text|>", "<|end_of_text|>"])
    trained = {"unigram": unigram, "bpe": bpe}
    for kind, specials in (("wordpiece", ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "<pad>", "</s>",
                                          "<mask>"]),
                           ("unigram-order wordpiece", ["<s>", "<pad>", "</s>", "[UNK]", "<mask>", "[PAD]", "[CLS]",
                                                        "[SEP]", "[MASK]"])):
        trained[kind] = BertWordPieceTokenizer(lowercase=True)
        trained[kind].train_from_iterator(texts, vocab_size=VOCAB, show_progress=False, special_tokens=specials)
    VOCABULARIES.mkdir(exist_ok=True)
    for kind, trainer in trained.items():
        model = json.loads(trainer._tokenizer.to_str())["model"]
        (VOCABULARIES / f"{kind.replace(' ', '-')}.json").write_text(json.dumps(model, ensure_ascii=False))


def make_tokenizer(kind: str):
    """The transformers tokenizer class a real model of this kind ships with, on a trained vocabulary."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import (AlbertTokenizer, BertTokenizer, CamembertTokenizer, DebertaTokenizer,
                              DebertaV2Tokenizer, MPNetTokenizer, RobertaTokenizer, XLMRobertaTokenizer)
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    if kind == "mpnet":  # <s>, <pad>, </s> at 0, 1, 2 as in MPNet's own vocabulary
        return MPNetTokenizer(vocab=_trained("unigram-order wordpiece")["vocab"], unk_token="[UNK]")
    if kind.startswith("wordpiece"):
        vocab = _trained("wordpiece")["vocab"]
        tokenizer = BertTokenizer(vocab=vocab)
        if kind == "wordpiece-typed":  # BertTokenizer builds its own template: the generic class keeps this one
            backend = tokenizer.backend_tokenizer
            backend.post_processor = processors.TemplateProcessing(
                single="[CLS]:0 $A:0 [SEP]:1", pair="[CLS]:0 $A:0 [SEP]:1 $B:1 [SEP]:1",
                special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
            return TokenizersBackend(tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]",
                                     pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]",
                                     model_input_names=["input_ids", "token_type_ids", "attention_mask"])
        return tokenizer
    if kind in ("xlmr", "camembert", "albert", "deberta-v2"):
        pieces = [tuple(piece) for piece in _trained("unigram")["vocab"]]
        cls = {"xlmr": XLMRobertaTokenizer, "camembert": CamembertTokenizer, "albert": AlbertTokenizer,
               "deberta-v2": DebertaV2Tokenizer}[kind]
        if kind in ("albert", "deberta-v2"):  # [CLS] … [SEP], with the pad token at id 1 as well
            return cls(vocab=pieces, unk_token="<unk>", pad_token="<pad>")
        return cls(vocab=pieces)
    bpe = _trained("bpe")
    vocab, merges = bpe["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    if kind == "bytebpe":
        return RobertaTokenizer(vocab=vocab, merges=merges)
    if kind == "deberta":
        return DebertaTokenizer(vocab=vocab, merges=merges, pad_token="<pad>")
    first, last = ("[CLS]", "[SEP]") if kind == "cls-sep-bpe" else ("<|begin_of_text|>", "<|end_of_text|>")
    backend = Tokenizer(BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", pair=f"{first} $A {last} $B {last}",
        special_tokens=[(first, vocab[first]), (last, vocab[last])])
    return TokenizersBackend(tokenizer_object=backend, bos_token=first, eos_token=last, cls_token=first,
                             sep_token=last, pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def build(arch: Tiny, folder: Path, **config_changes) -> Path:
    """Save a tiny model of `arch` (fixed seed) with its tokenizer into `folder`."""
    from transformers import AutoConfig, AutoModel

    tokenizer = make_tokenizer(arch.tokenizer)
    defaults = AutoConfig.for_model(arch.model_type)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id or tokenizer.cls_token_id,
           "eos_token_id": tokenizer.eos_token_id or tokenizer.sep_token_id, "cls_token_id": tokenizer.cls_token_id,
           "sep_token_id": tokenizer.sep_token_id, "mask_token_id": tokenizer.mask_token_id}
    settings = {key: value for key, value in {**SIZES, **ids}.items() if hasattr(defaults, key) and value is not None}
    if arch.reserved:  # RoBERTa's kin: the first token sits at position pad_token_id + 1 = 2
        assert tokenizer.pad_token_id == 1
    settings.update(vocab_size=len(tokenizer), max_position_embeddings=LIMIT + (2 if arch.reserved else 0))
    config = AutoConfig.for_model(arch.model_type, **{**settings, **arch.config, **config_changes})
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    with torch.no_grad():  # random init leaves some tensors (norms, biases) at 1 or 0: give them all a value
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
