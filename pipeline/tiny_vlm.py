"""A tiny LLaVA-style VLM with random weights, built offline: for tests, benchmarks and local dry runs.

CLIP vision tower (32 px, 8 px patches) + Llama text model, a BPE tokenizer
trained on the spot with `tokenizers`, a LlavaProcessor with a chat template;
saved with `save_pretrained`, so `AutoModelForImageTextToText`,
`AutoProcessor` and `transformers serve` load it like any hub model. Its
captions are gibberish made of real words.

The weights are stored in the hub's LLaVA layout (`vision_tower.vision_model.…`,
as in llava-hf checkpoints), which transformers 5 saves as `vision_tower.…`:
vLLM's LLaVA loader reads only the hub layout, transformers reads both. The
text model's head_dim is 64 (hidden 256, 4 heads): vLLM's CPU attention
refuses smaller heads. The hf, openai and vllm tests share this one model.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("a the an of on in with and to at near above below left right top bottom centre middle small large big "
         "tiny red green blue yellow orange purple white black grey striped dotted plain circle square triangle "
         "star ring cross shape object background image shows is are there two three one digit printed behind "
         "next corner edge light dark bright pale").split()

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_vlm(out_dir: str | Path, seed: int = 0, hidden: int = 256, layers: int = 2) -> Path:
    """Write the model, tokenizer and processor into out_dir; returns it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [".", ","],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    hub_layout(out / "model.safetensors")
    return out


def hub_layout(path: Path) -> None:
    """Rename `vision_tower.X` to `vision_tower.vision_model.X` in a saved LLaVA (a no-op when already so)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    renamed = {(f"vision_tower.vision_model.{k[len('vision_tower.'):]}"
                if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
               for k, v in tensors.items()}
    save_file(renamed, str(path), metadata=meta)
