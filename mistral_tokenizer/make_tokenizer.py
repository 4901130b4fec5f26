"""Regenerate this folder: the Mistral 7B v0.1 tokenizer (32000-token SentencePiece BPE) in Hugging Face format.

    pip install mistral-common sentencepiece protobuf && python mistral_tokenizer/make_tokenizer.py

The SentencePiece model ships inside the `mistral-common` package as `mistral_common/data/tokenizer.model.v1`.
transformers converts it to a fast (tokenizers) tokenizer; we then adjust two details of that conversion so the
result encodes exactly like SentencePiece itself (see `match_sentencepiece`), and save it next to this script.
"""

import importlib.resources
import json
import shutil
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import models, normalizers
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

OUT_DIR = Path(__file__).resolve().parent
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def find_sentencepiece_model() -> Path:
    """Path of the Mistral 7B v0.1 SentencePiece model inside the installed mistral-common package."""
    path = Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is mistral-common installed?")
    return path


def match_sentencepiece(backend, sp: spm.SentencePieceProcessor) -> None:
    """Make the converted `tokenizers.Tokenizer` encode exactly like SentencePiece, in place.

    1. Merge order. SentencePiece BPE merges the adjacent pair whose result has the highest score; transformers 5
       ranks merges by token id instead. The two orders agree except for the whitespace-run pieces ("▁▁", "▁▁▁▁", ...),
       which have low ids but a score of -1e9, so "a  b" would come out as "▁a", "▁▁", "b" instead of "▁a", "▁", "▁b".
       We rebuild the merge list ranked by score (only normal pieces, never control or byte tokens). Those
       whitespace pieces all tie at -1e9, and SentencePiece then merges the leftmost pair, which grows a run of
       spaces from the left into the longest pieces; ranking longer results first among ties reproduces that.
    2. Dummy prefix. SentencePiece always prepends "▁" to the text (add_dummy_prefix); the Metaspace pre-tokenizer
       skips it when the text already starts with a space, so " = Title =" would lose a "▁". We use the same
       normalizer as the classic Llama conversion instead: prepend "▁", then replace every " " with "▁".
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = [i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    merges = []  # (sort key, (left, right))
    for i in normal:
        piece = sp.id_to_piece(i)
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                # Best score first; among ties, longer merged piece, then longer left part, then ids (reproducible).
                key = (-sp.get_score(i), -len(piece), -len(left), vocab[left], vocab[right])
                merges.append((key, (left, right)))
    merges.sort()
    backend.model = models.BPE(vocab=vocab, merges=[pair for _, pair in merges], unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def main() -> None:
    source = find_sentencepiece_model()
    sp = spm.SentencePieceProcessor(model_file=str(source))

    with tempfile.TemporaryDirectory() as tmp:
        # LlamaTokenizer looks for `tokenizer.model` and converts it (needs sentencepiece + protobuf).
        shutil.copy(source, Path(tmp) / "tokenizer.model")
        converted = LlamaTokenizer.from_pretrained(tmp, **SPECIAL_TOKENS)

    backend = converted.backend_tokenizer
    match_sentencepiece(backend, sp)

    # Save as a plain fast tokenizer so that AutoTokenizer reloads tokenizer.json as is (LlamaTokenizer would
    # rebuild its own pre-tokenizer on load and undo the dummy-prefix fix). BOS is added, EOS is not, like Mistral.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, add_bos_token=True, add_eos_token=False,
                                        clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    assert len(tokenizer) == sp.get_piece_size() == 32000
    assert tokenizer("Hello world").input_ids == [sp.bos_id()] + sp.encode("Hello world")

    tokenizer.save_pretrained(OUT_DIR)
    # Name the class by its portable alias rather than "TokenizersBackend", which only transformers 5 knows.
    # (BOS-without-EOS lives in tokenizer.json's post-processor; transformers 5 ignores add_bos_token flags here.)
    config_path = OUT_DIR / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(source, OUT_DIR / "tokenizer.model")  # the original SentencePiece file, for reference
    special_map = OUT_DIR / "special_tokens_map.json"  # transformers 5 no longer writes this file
    if not special_map.exists():
        special_map.write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n")
    print(f"saved {len(tokenizer)}-token tokenizer from {source} to {OUT_DIR}")


if __name__ == "__main__":
    main()
