"""Build a tiny random-weight AltCLIP with a real SentencePiece-unigram XLM-R-style tokenizer."""

from __future__ import annotations

import io
import itertools
import os

import click

from jobs.options import finish_job, json_result

# Sentences in several scripts (Latin, Cyrillic, Arabic, Greek, Devanagari, Hebrew, CJK, Hangul),
# combined so the unigram model sees each word in many contexts.
_SUBJECTS = {
    "en": ["a cat", "a dog", "a red car", "the mountains", "a bowl of soup", "two children"],
    "es": ["un gato", "un perro", "un coche rojo", "las montañas", "un plato de sopa", "dos niños"],
    "de": ["eine Katze", "ein Hund", "ein rotes Auto", "die Berge", "eine Schüssel Suppe", "zwei Kinder"],
    "fr": ["un chat", "un chien", "une voiture rouge", "les montagnes", "un bol de soupe", "deux enfants"],
    "ru": ["кошка", "собака", "красная машина", "горы", "тарелка супа", "двое детей"],
    "ar": ["قطة", "كلب", "سيارة حمراء", "الجبال", "وعاء من الحساء", "طفلان"],
    "el": ["μια γάτα", "ένας σκύλος", "ένα κόκκινο αυτοκίνητο", "τα βουνά", "ένα μπολ σούπα", "δύο παιδιά"],
    "hi": ["एक बिल्ली", "एक कुत्ता", "एक लाल कार", "पहाड़", "सूप का कटोरा", "दो बच्चे"],
    "he": ["חתול", "כלב", "מכונית אדומה", "ההרים", "קערת מרק", "שני ילדים"],
    "zh": ["一只猫", "一只狗", "一辆红色的汽车", "群山", "一碗汤", "两个孩子"],
    "ja": ["猫", "犬", "赤い車", "山々", "スープ一杯", "二人の子供"],
    "ko": ["고양이", "개", "빨간 자동차", "산", "수프 한 그릇", "두 아이"],
}
_TEMPLATES = {
    "en": ["a photo of {}", "{} in the snow", "a painting of {}", "{} at night"],
    "es": ["una foto de {}", "{} en la nieve", "una pintura de {}", "{} de noche"],
    "de": ["ein Foto von {}", "{} im Schnee", "ein Gemälde von {}", "{} bei Nacht"],
    "fr": ["une photo de {}", "{} dans la neige", "une peinture de {}", "{} la nuit"],
    "ru": ["фотография: {}", "{} в снегу", "картина: {}", "{} ночью"],
    "ar": ["صورة {}", "{} في الثلج", "لوحة {}", "{} في الليل"],
    "el": ["μια φωτογραφία με {}", "{} στο χιόνι", "ένας πίνακας με {}", "{} τη νύχτα"],
    "hi": ["{} की तस्वीर", "बर्फ में {}", "{} की पेंटिंग", "रात में {}"],
    "he": ["תמונה של {}", "{} בשלג", "ציור של {}", "{} בלילה"],
    "zh": ["{}的照片", "雪中的{}", "{}的画", "夜晚的{}"],
    "ja": ["{}の写真", "雪の中の{}", "{}の絵", "夜の{}"],
    "ko": ["{}의 사진", "눈 속의 {}", "{}의 그림", "밤의 {}"],
}


def sample_captions() -> list[tuple[str, str]]:
    """(language, caption) pairs in many scripts."""
    return [
        (lang, template.format(subject))
        for lang in _SUBJECTS
        for template, subject in itertools.product(_TEMPLATES[lang], _SUBJECTS[lang])
    ]


def _train_tokenizer(vocab_size: int, max_tokens: int):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from transformers import XLMRobertaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([c for _, c in sample_captions()] * 3),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    # XLM-R's order: <s>, <pad>, </s>, <unk>, the SentencePiece pieces, <mask>.
    specials = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [(p.piece, p.score) for p in proto.pieces if p.type == p.NORMAL]
    return XLMRobertaTokenizer(
        vocab=specials + pieces + [("<mask>", 0.0)],
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        model_max_length=max_tokens,
    )


def make_test_model(out_dir: str, seed: int = 0, vocab_size: int = 600) -> str:
    """Save a tiny AltCLIP (random weights) + processor that `from_pretrained` loads unchanged."""
    import torch
    from transformers import (
        AltCLIPConfig,
        AltCLIPModel,
        AltCLIPProcessor,
        AltCLIPTextConfig,
        AltCLIPVisionConfig,
        CLIPImageProcessorPil,
    )

    max_tokens = 64
    tokenizer = _train_tokenizer(vocab_size, max_tokens)
    vision = AltCLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=224, patch_size=32, projection_dim=64,
    )
    text = AltCLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_tokens + 2, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, project_dim=48,
    )
    config = AltCLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64
    )
    torch.manual_seed(seed)
    model = AltCLIPModel(config).eval()
    # Random init leaves LayerNorms at identity and biases at zero; perturb every parameter
    # so no part of a tower is a no-op that a loading bug could hide behind.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    from pipeline.embed.model import RANDOM_WEIGHTS_KEY

    setattr(model.config, RANDOM_WEIGHTS_KEY, True)  # what it embeds is said to be meaningless
    os.makedirs(out_dir, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar for one small file is only noise in a log
    model.save_pretrained(out_dir)
    AltCLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


@click.command("make-test-model")
@click.argument("out_dir")
@click.option("--seed", default=0, type=int, help="Seed of the random weights.")
@json_result
def make_test_model_command(out_dir, seed, as_json):
    """Save a tiny random-weight AltCLIP to OUT_DIR (for tests).

    Its vectors are meaningless; the tokenizer is a real SentencePiece one."""
    make_test_model(out_dir, seed=seed)
    finish_job({"model": out_dir}, [f"tiny random-weight AltCLIP saved to {out_dir}"], as_json)
